"""Calibration methods: from a tensor's |x| histogram to the amax (clipping threshold) of symmetric int8.

The int8 scale of a tensor is amax / 127: 128 levels of |x| on [0, amax]. A tensor that is non-negative by
construction (a ReLU output, see passes/insert_qdq) is quantized on an *unsigned grid* instead: centred at
amax / 2, so the int8 values -127..127 cover [0, amax] with 255 levels, twice the resolution (`activation_grid`).
Each method trades clipping error (values above amax saturate) against
rounding error (a larger amax means a coarser step):

- minmax: amax = absmax. No clipping; one outlier can waste most of the 256 levels.
- entropy: TensorRT's KL-divergence calibration ("8-bit Inference with TensorRT", GTC 2017); the default of
  TensorRT's EntropyCalibrator2 and of trtglm, robust on heavy-tailed activations.
- percentile: the |x| below which `percentile` percent of the values lie.
- mse: the amax minimising the expected squared quantization error, estimated from the histogram.

Conventions shared by all methods (bin j of the histogram covers [j*w, (j+1)*w), w = hist_range / NUM_BINS):
- thresholds are bin *upper* edges, i*w, so the kept bins are exactly bins 0..i-1 with nothing cut inside them;
- every result is clipped to the tensor's absmax (a larger amax only wastes levels), rounded to float32 and
  floored at MIN_AMAX, so an all-zero tensor still gets a positive scale and nothing downstream divides by 0.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from trtglm.calib.stats import MIN_RANGE, TensorStats
from trtglm.errors import ConfigError

METHODS = ("entropy", "minmax", "percentile", "mse")
MIN_AMAX = MIN_RANGE  # the histogram resolves nothing below this; tensors this small are zero at int8
QUANT_LEVELS = 128  # levels of |x| in symmetric int8 (0..127): the size of the quantized distribution Q
UNSIGNED_LEVELS = 255  # levels on [0, amax] of a centred grid (-127..127 around amax / 2)
START_BIN = 128  # the smallest threshold considered by entropy and mse, in bins


@dataclass(frozen=True)
class Scales:
    """Calibrated amax per tensor name and the method that produced it ("cache" when read from a cache)."""

    amax: dict[str, float]
    method: dict[str, str]

    def scale(self, name: str) -> np.float32:
        """The int8 scale amax/127, divided in float64 and rounded once to float32 (as the cache stores it)."""
        return np.float32(float(self.amax[name]) / 127.0)

    def merged(self, other: Scales) -> Scales:
        """Both sets of scales; where a tensor is in both, `other` wins."""
        return Scales({**self.amax, **other.amax}, {**self.method, **other.method})


def activation_grid(amax: float, unsigned: bool = False) -> tuple[np.float32, np.float32]:
    """(scale, centre) of an activation's int8 grid: x -> centre + scale * clip(round((x - centre) / scale), -127,
    127). Signed: amax / 127 around 0. Unsigned: amax / 254 around 127 * scale, so that 0 (ReLU's zeros, zero
    padding) is the grid point -127 exactly."""
    if not unsigned:
        return np.float32(max(amax, 1e-12) / 127.0), np.float32(0.0)
    scale = np.float32(max(amax, 1e-12) / 254.0)
    return scale, np.float32(127.0 * scale)


def amax_from_stats(stats: TensorStats, method: str, percentile: float = 99.99, unsigned: bool = False) -> float:
    """The clipping threshold of one tensor: a positive, float32-representable float. `unsigned`: for the
    unsigned grid (255 levels on [0, amax]), which entropy and mse trade off differently."""
    levels = UNSIGNED_LEVELS if unsigned else QUANT_LEVELS
    if method == "minmax":
        value = stats.absmax
    elif method == "entropy":
        value = _from_bins(stats, entropy_bins(stats.hist, levels))
    elif method == "percentile":
        value = _from_bins(stats, percentile_bins(stats.hist, percentile))
    elif method == "mse":
        value = _from_bins(stats, mse_bins(stats.hist, levels))
    else:
        raise ConfigError(f"calibration method {method!r}: choose one of {', '.join(METHODS)}")
    return float(max(np.float32(min(value, stats.absmax)), np.float32(MIN_AMAX)))


def scales_from_stats(stats: dict[str, TensorStats], method: str, percentile: float = 99.99) -> Scales:
    """Scales of every tensor, computed in sorted name order (byte-identical across runs)."""
    return scales_for(stats, {name: method for name in stats}, percentile)


def scales_for(stats: dict[str, TensorStats], methods: dict[str, str], percentile: float = 99.99,
               unsigned: frozenset[str] = frozenset()) -> Scales:
    """Scales of every tensor with its own method (`methods`: tensor name -> method); the tensors in `unsigned`
    are calibrated for the unsigned grid."""
    names = sorted(stats)
    # tensors are independent and numpy releases the GIL: a thread per core; map() keeps the sorted order
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        amax = list(pool.map(lambda n: amax_from_stats(stats[n], methods[n], percentile, n in unsigned), names))
    return Scales(dict(zip(names, amax)), {n: methods[n] for n in names})


def _from_bins(stats: TensorStats, bins: int | None) -> float:
    """Bins kept -> threshold (upper edge of the last kept bin); None (too few bins to choose from) -> absmax."""
    return stats.absmax if bins is None else bins * stats.bin_width


def percentile_bins(hist: np.ndarray, percentile: float) -> int | None:
    """Smallest i such that bins 0..i-1 hold at least `percentile` percent of the values."""
    cum = np.cumsum(hist, dtype=np.int64)
    if cum[-1] == 0:
        return None
    target = percentile / 100.0 * float(cum[-1])
    return int(np.searchsorted(cum, target, side="left")) + 1


def entropy_bins(hist: np.ndarray, levels: int = QUANT_LEVELS) -> int | None:
    """TensorRT's KL-divergence search: the number of bins i (a threshold of i bins) minimising KL(P || Q).

    For each candidate i in max(START_BIN, levels)..last nonzero bin + 1:
      P = hist[:i] with the outliers sum(hist[i:]) added to bin i-1 (clipping maps them to the threshold);
      Q = hist[:i] (without outliers) merged into `levels` (128; 255 for the unsigned grid) contiguous chunks of
          i // levels bins (the last takes the remainder), each chunk's total spread evenly over its bins where P > 0;
      both normalised; KL summed over bins where P > 0.
    Q is zero where P > 0 only when the last chunk holds no values but outliers land in its bin i-1; such a
    candidate cannot represent the mass at the threshold, so its divergence is +inf (no epsilon is added).
    Ties go to the smallest i. Returns None when there are too few bins to choose from.

    Vectorised over all candidates with prefix sums: with N values in all, M = sum(hist[:i]), chunk totals C_k
    over n_k nonzero bins (counting P's nonzero bins), KL = (sum P log P - sum_k C'_k log(C_k / n_k)) / N
    + log(M / N), where C'_k is P's total in chunk k (C_k, plus the outliers for the last chunk).
    """
    h = np.asarray(hist, dtype=np.float64)
    nonzero = np.flatnonzero(h)
    start = max(START_BIN, levels)
    if nonzero.size == 0 or nonzero[-1] + 1 < start:
        return None
    stop = int(nonzero[-1]) + 1
    total = h.sum()
    cum = np.concatenate(([0.0], np.cumsum(h)))  # cum[j] = sum(h[:j])
    cnz = np.concatenate(([0], np.cumsum(h > 0)))  # nonzero bins among h[:j]
    hlogh = np.zeros_like(h)
    hlogh[h > 0] = h[h > 0] * np.log(h[h > 0])
    chlogh = np.concatenate(([0.0], np.cumsum(hlogh)))

    cand = np.arange(start, stop + 1)  # i
    outliers = total - cum[cand]
    last_p = h[cand - 1] + outliers  # P[i-1]
    # chunk edges: k * (i // levels) for k < levels, then i
    edges = (cand // levels)[:, None] * np.arange(levels + 1)[None, :]
    edges[:, -1] = cand
    chunk = cum[edges[:, 1:]] - cum[edges[:, :-1]]  # C_k, from hist without outliers
    nbins = (cnz[edges[:, 1:]] - cnz[edges[:, :-1]]).astype(np.float64)
    nbins[:, -1] += (h[cand - 1] == 0) & (outliers > 0)  # outliers make P's bin i-1 nonzero
    p_total = chunk.copy()
    p_total[:, -1] += outliers  # C'_k
    with np.errstate(divide="ignore", invalid="ignore"):
        plogq = np.where(chunk > 0, p_total * np.log(chunk / np.maximum(nbins, 1.0)), 0.0).sum(axis=1)
        plogp = chlogh[cand - 1] + np.where(last_p > 0, last_p * np.log(last_p), 0.0)
        kl = (plogp - plogq) / total + np.log(cum[cand] / total)
    kl[(chunk[:, -1] == 0) & (outliers > 0)] = np.inf  # Q is 0 at bin i-1 where P is not
    return int(cand[int(np.argmin(kl))])


def mse_bins(hist: np.ndarray, levels: int = QUANT_LEVELS) -> int | None:
    """The threshold i (in bins, START_BIN..last nonzero bin + 1) minimising the expected squared int8 error.

    A value below the threshold a contributes the uniform rounding noise step**2 / 12 (step = a / (levels - 1):
    a / 127, or a / 254 on the unsigned grid); a value
    above it is clipped to a and contributes (c - a)**2, c its bin centre. Tail sums make it O(bins). In bin units.
    """
    h = np.asarray(hist, dtype=np.float64)
    nonzero = np.flatnonzero(h)
    if nonzero.size == 0 or nonzero[-1] + 1 < START_BIN:
        return None
    stop = int(nonzero[-1]) + 1
    centres = np.arange(h.size) + 0.5
    tail = lambda v: np.concatenate((np.cumsum(v[::-1])[::-1], [0.0]))  # tail(v)[j] = sum(v[j:])  # noqa: E731
    s0, s1, s2 = tail(h), tail(h * centres), tail(h * centres**2)
    cand = np.arange(START_BIN, stop + 1)
    a = cand.astype(np.float64)
    inside = s0[0] - s0[cand]
    err = inside * (a / (levels - 1.0)) ** 2 / 12.0 + (s2[cand] - 2.0 * a * s1[cand] + a * a * s0[cand])
    return int(cand[int(np.argmin(err))])
