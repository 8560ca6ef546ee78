"""A bounded, deterministic, mergeable sample of an activation's rows (its vectors along the last axis).

Histograms say how a tensor's values are spread, not what they do downstream. To choose a SmoothQuant strength or
a calibration method by the error a choice causes in the layer that reads the tensor, the search needs real rows
of the activation to multiply with the layer's weights. Calibration streams every batch once, so at most
`capacity` rows are kept.

Which rows: every row gets a pseudo-random 64-bit key from (tensor name, batch index, row index in the batch), and
the sample is the `capacity` rows with the smallest keys, in key order (bottom-k sampling). Each row of the stream
is equally likely to be kept, and the sample depends only on which rows exist, not on the order they arrive in or
how the batches were split: streaming one process, or merging the samples of any partition of the batches over
any number of workers in any order, gives the same rows in the same order, bit for bit. A batch seen twice (a
retried shard) adds nothing: its rows have the same keys.
"""

from __future__ import annotations

import zlib

import numpy as np

CAPACITY = 1024
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def row_keys(seed: int, batch: int, rows: int) -> np.ndarray:
    """splitmix64 of (seed, batch, row): uint64 keys, distinct for distinct (batch, row) pairs in practice."""
    ids = (np.uint64(batch) << np.uint64(32)) | np.arange(rows, dtype=np.uint64)
    x = ids ^ np.uint64(seed)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


class RowSample:
    def __init__(self, name: str, capacity: int = CAPACITY):
        self.name = name
        self.capacity = capacity
        self.seen = 0
        self._seed = zlib.crc32(name.encode())
        self._keys = np.zeros(0, dtype=np.uint64)
        self._rows: np.ndarray | None = None
        self._width: int | None = None  # None until the first rows; -1: the last axis changed size (no sample)

    def update(self, x: np.ndarray, batch: int) -> None:
        """Offer the rows of batch number `batch` (its index in the whole calibration stream)."""
        if x.ndim < 2 or x.size == 0 or self._width == -1:
            return
        rows = np.asarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
        self.seen += len(rows)
        self._add(row_keys(self._seed, batch, len(rows)), rows)

    def merge(self, other: RowSample) -> RowSample:
        """A sample of both streams: the same as streaming every batch of both through one sample."""
        out = RowSample(self.name, self.capacity)
        out.seen = self.seen + other.seen
        for part in (self, other):
            if part._width == -1:
                out._width = -1
            elif part._rows is not None:
                out._add(part._keys, part._rows)
        return out

    def _add(self, keys: np.ndarray, rows: np.ndarray) -> None:
        if self._width is None:
            self._width = rows.shape[1]
        if rows.shape[1] != self._width or self._width == -1:
            self._width, self._keys, self._rows = -1, np.zeros(0, dtype=np.uint64), None
            return  # the last axis changed size: not a fixed channel axis, nothing to sample
        if len(self._keys) >= self.capacity:  # only rows that beat the current largest kept key can enter
            better = keys < self._keys[-1]
            keys, rows = keys[better], rows[better]
        keys = np.concatenate([self._keys, keys])
        rows = rows if self._rows is None else np.concatenate([self._rows, rows])
        keys, first = np.unique(keys, return_index=True)  # sorted; a row seen twice (same key) is kept once
        keep = first[: self.capacity]
        self._keys, self._rows = keys[: self.capacity], rows[keep]

    def truncated(self, keep: int) -> tuple[RowSample, int | None]:
        """(the `keep` rows with the smallest keys, bound): every row of this sample whose key is below `bound` is
        kept; None when nothing was dropped. A worker sends the truncated sample of its shard, and the driver can
        tell whether the merge is still exact (trtglm.calib.ray_executor)."""
        out = RowSample(self.name, self.capacity)
        out.seen, out._width = self.seen, self._width
        out._keys = self._keys[:keep]
        out._rows = None if self._rows is None else self._rows[:keep]
        return out, (int(self._keys[keep]) if len(self._keys) > keep else None)

    @property
    def keys(self) -> np.ndarray:
        return self._keys

    @property
    def rows(self) -> np.ndarray | None:
        return None if self._rows is None or self._width == -1 else self._rows
