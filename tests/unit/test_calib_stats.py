"""Streamed statistics: exact re-binning, merge == streaming in any order, NaN/Inf errors, zero tensors."""

import numpy as np
import pytest

from trtglm.calib.stats import MIN_RANGE, NUM_BINS, TensorStats, range_for
from trtglm.errors import CalibrationError


def _direct_hist(values, hist_range):
    """Bin everything at once with the final range: floor(|x| * NUM_BINS / range), in float64; zeros apart."""
    values = np.asarray(values, dtype=np.float64)
    idx = np.floor(np.abs(values[values != 0]) * NUM_BINS / hist_range).astype(np.int64)
    return np.bincount(idx, minlength=NUM_BINS)


def _batches(seed=0):
    """Batches whose ranges grow by uneven factors (including one jump of more than NUM_BINS)."""
    rng = np.random.default_rng(seed)
    scales = [1e-6, 3e-3, 0.7, 1.0, 2.0, 50.0, 0.1, 1000.0, 3.0]
    batches = [(rng.standard_t(3, size=int(rng.integers(1, 500))) * s).astype(np.float32) for s in scales]
    return [np.maximum(b, 0) if i % 2 else b for i, b in enumerate(batches)]  # ReLU-like zeros in half


def _assert_same(a: TensorStats, b: TensorStats):
    assert a.hist_range == b.hist_range
    np.testing.assert_array_equal(a.hist, b.hist)
    assert (a.absmax, a.count, a.zeros, a.min, a.max) == (b.absmax, b.count, b.zeros, b.min, b.max)


def test_range_is_next_power_of_two_strictly_above():
    assert range_for(1.0) == 2.0
    assert range_for(1.5) == 2.0
    assert range_for(0.5) == 1.0
    assert range_for(0.0) == MIN_RANGE
    assert range_for(MIN_RANGE / 3) == MIN_RANGE
    assert range_for(3e38) == 2.0**128


def test_streaming_rebinning_equals_direct_binning():
    batches = _batches()
    stats = TensorStats("t")
    for batch in batches:
        stats.update(batch)
    everything = np.concatenate(batches)
    assert stats.hist_range == range_for(float(np.abs(everything).max()))
    np.testing.assert_array_equal(stats.hist, _direct_hist(everything, stats.hist_range))
    assert stats.absmax == float(np.abs(everything).max())
    assert stats.count == everything.size
    assert (stats.min, stats.max) == (float(everything.min()), float(everything.max()))
    assert stats.hist.dtype == np.int64 and stats.hist.sum() + stats.zeros == everything.size
    assert stats.zeros == int((everything == 0).sum()) > 0


def test_power_of_two_values_land_in_range():
    stats = TensorStats("t")
    stats.update(np.array([1.0, -1.0, 0.5, 0.0], dtype=np.float32))
    assert stats.hist_range == 2.0
    assert stats.hist[NUM_BINS // 2] == 2 and stats.hist[NUM_BINS // 4] == 1 and stats.hist[0] == 0 and stats.zeros == 1
    stats.update(np.array([2.0], dtype=np.float32))  # grows to 4: 1.0 moves to bin 512, 2.0 to bin 1024
    assert stats.hist_range == 4.0
    assert stats.hist[NUM_BINS // 4] == 2 and stats.hist[NUM_BINS // 2] == 1 and stats.hist[NUM_BINS // 8] == 1


@pytest.mark.parametrize("seed", range(5))
def test_merge_of_random_partitions_is_bit_identical_to_streaming(seed):
    rng = np.random.default_rng(seed)
    batches = _batches(seed)
    streamed = TensorStats("t")
    for batch in batches:
        streamed.update(batch)
    order = rng.permutation(len(batches))
    cuts = np.sort(rng.choice(np.arange(1, len(batches)), size=3, replace=False))
    parts = []
    for group in np.split(order, cuts):
        part = TensorStats("t")
        for i in group:
            part.update(batches[i])
        parts.append(part)
    parts.append(TensorStats("t"))  # an empty part is the identity
    rng.shuffle(parts)
    merged = parts[0]
    for part in parts[1:]:
        merged = merged.merge(part) if rng.random() < 0.5 else part.merge(merged)  # commutative
    _assert_same(merged, streamed)
    # associativity: (a + b) + c == a + (b + c)
    a, b, c = parts[0], parts[1], parts[2]
    _assert_same(a.merge(b).merge(c), a.merge(b.merge(c)))


def test_merge_does_not_mutate_inputs():
    a, b = TensorStats("t"), TensorStats("t")
    a.update(np.array([0.25], dtype=np.float32))
    b.update(np.array([8.0], dtype=np.float32))
    hist_before = a.hist.copy()
    a.merge(b)
    np.testing.assert_array_equal(a.hist, hist_before)
    assert a.hist_range == 0.5


@pytest.mark.parametrize("bad, word", [(np.nan, "NaN"), (np.inf, "Inf"), (-np.inf, "Inf")])
def test_non_finite_values_name_tensor_and_batch(bad, word):
    stats = TensorStats("conv1_out")
    for _ in range(3):
        stats.update(np.ones(4, dtype=np.float32))
    with pytest.raises(CalibrationError, match=f"tensor 'conv1_out' has {word} values in batch 3"):
        stats.update(np.array([1.0, bad, 2.0], dtype=np.float32))


def test_all_zero_and_empty_tensors():
    stats = TensorStats("z")
    stats.update(np.zeros((2, 3), dtype=np.float32))
    stats.update(np.zeros((0, 3), dtype=np.float32))
    assert stats.absmax == 0.0 and stats.hist_range == MIN_RANGE
    assert stats.hist[0] == 0 and stats.zeros == 6 and stats.count == 6 and stats.batches == 2


def test_float16_and_float64_inputs():
    stats = TensorStats("t")
    stats.update(np.array([0.1, -3.0], dtype=np.float16))
    stats.update(np.array([1e-30, 2.5], dtype=np.float64))
    assert stats.absmax == 3.0 and stats.hist_range == 4.0 and stats.count == 4
