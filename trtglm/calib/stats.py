"""Streamed per-tensor activation statistics: absmax and a histogram of |x|.

Calibration sees every activation of every batch, so nothing here keeps activations: each batch is folded into
a fixed-size histogram and then dropped. The histogram covers [0, hist_range) in NUM_BINS equal bins, where
hist_range is always a power of two strictly greater than the absmax seen so far (never below MIN_RANGE).

Why powers of two: a value's bin is floor(|x| * NUM_BINS / hist_range). With NUM_BINS and hist_range powers of two
that product is an exact float64 scaling, and when the range doubles k times the new bin is exactly
floor(old_bin / 2**k). So growing the range re-bins by summing groups of 2**k adjacent bins with no loss, and the
histogram depends only on the data, not on batch order or how the data were split: streaming, merging partial
statistics in any order, and binning everything at once with the final range all give the same counts.

Exact zeros are counted apart (`zeros`), not in the histogram: symmetric INT8 represents 0 exactly, so they add
no quantization error, and after a ReLU they are half of all values: a spike in bin 0 that would dominate the
KL divergence and drive the entropy threshold down to the smallest candidate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from trtglm.errors import CalibrationError

NUM_BINS = 2048
MIN_RANGE = 2.0**-24  # histogram range of an all-zero (or vanishingly small) tensor
_CHUNK = 1 << 22  # elements converted to float64 at a time: bounds the temporary memory of huge activations


def range_for(absmax: float) -> float:
    """The histogram range for data whose largest |x| is `absmax`: the smallest power of two > absmax."""
    if absmax < MIN_RANGE:
        return MIN_RANGE
    _, exp = math.frexp(absmax)  # absmax = m * 2**exp with 0.5 <= m < 1, so 2**(exp-1) <= absmax < 2**exp
    return math.ldexp(1.0, exp)


def rebin(hist: np.ndarray, old_range: float, new_range: float) -> np.ndarray:
    """Re-express a histogram over [0, old_range) with range new_range (both powers of two, new >= old)."""
    factor = int(new_range / old_range)  # exact: a ratio of powers of two
    if factor == 1:
        return hist.copy()
    out = np.zeros(NUM_BINS, dtype=np.int64)
    if factor >= NUM_BINS:
        out[0] = hist.sum()
    else:
        out[: NUM_BINS // factor] = hist.reshape(-1, factor).sum(axis=1)
    return out


def _empty_hist() -> np.ndarray:
    return np.zeros(NUM_BINS, dtype=np.int64)


@dataclass
class TensorStats:
    """Everything calibration keeps about one tensor; `merge` combines partial statistics exactly."""

    name: str
    absmax: float = 0.0
    count: int = 0  # number of values seen
    zeros: int = 0  # number of exact zeros seen (not in hist)
    hist: np.ndarray = field(default_factory=_empty_hist)  # counts of nonzero |x| per bin, int64
    hist_range: float = MIN_RANGE  # the bins cover [0, hist_range); a power of two
    min: float = 0.0  # signed extremes (meaningful when count > 0)
    max: float = 0.0
    batches: int = 0  # number of update() calls, to name the batch in error messages
    channel_absmax: np.ndarray | None = None  # max |x| per index of the last axis (SmoothQuant), float64

    @property
    def bin_width(self) -> float:
        return self.hist_range / NUM_BINS

    def update(self, x: np.ndarray) -> None:
        """Fold one batch of values into the statistics; raises CalibrationError on NaN or Inf."""
        batch = self.batches
        self.batches += 1
        x = np.asarray(x)
        if x.size == 0:
            return
        flat = x.reshape(-1)
        lo, hi = float(np.min(flat)), float(np.max(flat))
        if not (math.isfinite(lo) and math.isfinite(hi)):  # min/max propagate NaN, so this catches both
            what = "NaN" if np.isnan(flat).any() else "Inf"
            raise CalibrationError(
                f"calibration: tensor '{self.name}' has {what} values in batch {batch}; check that batch of the "
                f"calibration data for {what}/out-of-range values, or exclude the producing node with --exclude")
        absmax = max(abs(lo), abs(hi))
        new_range = range_for(max(absmax, self.absmax))
        if new_range > self.hist_range:
            self.hist = rebin(self.hist, self.hist_range, new_range)
            self.hist_range = new_range
        zeros = int(flat.size - np.count_nonzero(flat))
        self.hist += _histogram(flat, self.hist_range)
        self.hist[0] -= zeros
        self.zeros += zeros
        self.min = lo if self.count == 0 else min(self.min, lo)
        self.max = hi if self.count == 0 else max(self.max, hi)
        self.absmax = max(self.absmax, absmax)
        self.count += int(flat.size)
        if x.ndim >= 2:
            channels = np.abs(x.reshape(-1, x.shape[-1])).max(axis=0).astype(np.float64)
            self.channel_absmax = _channel_max(self.channel_absmax, channels)

    def merge(self, other: TensorStats) -> TensorStats:
        """A new TensorStats holding both; equal to streaming all data through one object, in any order."""
        rng = max(self.hist_range, other.hist_range)
        hist = rebin(self.hist, self.hist_range, rng) + rebin(other.hist, other.hist_range, rng)
        seen = [s for s in (self, other) if s.count > 0]
        return TensorStats(
            name=self.name,
            absmax=max(self.absmax, other.absmax),
            count=self.count + other.count,
            zeros=self.zeros + other.zeros,
            hist=hist,
            hist_range=rng,
            min=min(s.min for s in seen) if seen else 0.0,
            max=max(s.max for s in seen) if seen else 0.0,
            batches=self.batches + other.batches,
            channel_absmax=_channel_max(self.channel_absmax, other.channel_absmax),
        )


def _channel_max(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
    """Elementwise max of two per-channel maxima; a channel count that changes (no fixed last axis) gives None."""
    if a is None or b is None:
        return b if a is None else a
    return np.maximum(a, b) if a.shape == b.shape else None


def _histogram(flat: np.ndarray, hist_range: float) -> np.ndarray:
    """Counts of floor(|x| * NUM_BINS / hist_range); hist_range > max |x|, so every index is < NUM_BINS."""
    scale = NUM_BINS / hist_range  # a power of two: the product below is exact in float64
    counts = np.zeros(NUM_BINS, dtype=np.int64)
    for start in range(0, flat.size, _CHUNK):
        part = np.abs(flat[start : start + _CHUNK].astype(np.float64))
        part *= scale
        counts += np.bincount(part.astype(np.int64), minlength=NUM_BINS)  # truncation == floor for |x| >= 0
    return counts
