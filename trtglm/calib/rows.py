"""A bounded, deterministic sample of an activation's rows (its vectors along the last axis).

Histograms say how a tensor's values are spread, not what they do downstream. To choose a SmoothQuant strength or
a calibration method by the error a choice causes in the layer that reads the tensor, the search needs real rows
of the activation to multiply with the layer's weights. Calibration streams every batch once, so the rows are kept
by reservoir sampling: at most `capacity` rows, each row of the whole stream equally likely to be kept, with a
generator seeded from the tensor's name, so the same data give the same sample.
"""

from __future__ import annotations

import zlib

import numpy as np

CAPACITY = 1024


class RowSample:
    def __init__(self, name: str, capacity: int = CAPACITY):
        self.name = name
        self.capacity = capacity
        self.seen = 0
        self._rows: np.ndarray | None = None
        self._rng = np.random.default_rng(zlib.crc32(name.encode()))

    def update(self, x: np.ndarray) -> None:
        if x.ndim < 2 or x.size == 0:
            return
        rows = np.asarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
        if self._rows is None:
            self._rows = np.empty((self.capacity, rows.shape[1]), dtype=np.float32)
        elif rows.shape[1] != self._rows.shape[1]:
            return  # the last axis changed size: not a fixed channel axis, nothing to sample
        fill = min(max(self.capacity - self.seen, 0), len(rows))
        if fill:
            self._rows[self.seen : self.seen + fill] = rows[:fill]
        rest = np.arange(fill, len(rows))
        if rest.size:  # reservoir step for every later row: keep row i with probability capacity / (i + 1)
            slots = self._rng.integers(0, self.seen + rest + 1)
            keep = slots < self.capacity
            self._rows[slots[keep]] = rows[rest[keep]]  # later rows win ties, as in the sequential algorithm
        self.seen += len(rows)

    @property
    def rows(self) -> np.ndarray | None:
        if self._rows is None:
            return None
        return self._rows[: min(self.seen, self.capacity)]
