"""Calibration methods: entropy against a slow loop-by-loop reference of TensorRT's algorithm, and sanity of the
other methods."""

import math
import time

import numpy as np
import pytest

from trtglm.calib.methods import (MIN_AMAX, METHODS, Scales, amax_from_stats, entropy_bins, mse_bins,
                                  scales_from_stats)
from trtglm.calib.stats import NUM_BINS, TensorStats
from trtglm.errors import ConfigError


def reference_entropy_bins(hist):
    """TensorRT's KL-divergence threshold search, written as plainly as possible (explicit loops everywhere)."""
    hist = [int(v) for v in hist]
    stop = max(j for j in range(len(hist)) if hist[j] > 0) + 1
    best_i, best_kl = None, math.inf
    for i in range(128, stop + 1):
        outliers = 0
        for j in range(i, len(hist)):
            outliers += hist[j]
        p = [float(hist[j]) for j in range(i)]
        p[i - 1] += outliers
        # quantize hist[:i] (no outliers) into 128 chunks; the last chunk takes the remainder
        q = [0.0] * i
        size = i // 128
        for k in range(128):
            start = k * size
            end = (k + 1) * size if k < 127 else i
            chunk_total = 0
            nonzero = 0
            for j in range(start, end):
                chunk_total += hist[j]
                if p[j] != 0:
                    nonzero += 1
            for j in range(start, end):
                if p[j] != 0:
                    q[j] = chunk_total / nonzero
        p_sum, q_sum = sum(p), sum(q)
        kl = 0.0
        for j in range(i):
            if p[j] > 0:
                if q[j] == 0:
                    kl = math.inf
                    break
                kl += (p[j] / p_sum) * math.log((p[j] / p_sum) / (q[j] / q_sum))
        if kl < best_kl:  # strict: the first candidate wins ties
            best_i, best_kl = i, kl
    return best_i


def _stats(values, name="t"):
    s = TensorStats(name)
    s.update(np.asarray(values, dtype=np.float32))
    return s


def _distributions():
    rng = np.random.default_rng(7)
    laplace = rng.laplace(size=20000)
    laplace[:20] *= 30.0  # a few large outliers
    half_zero = np.abs(rng.normal(size=20000))
    half_zero[::2] = 0.0
    return {
        # scaled so the absmax sits just above a power of two: fewer candidates keep the slow reference fast
        "gaussian": rng.normal(size=20000) * (1.1 / 4.0),
        "laplace_outliers": laplace / np.abs(laplace).max() * 1.05,
        "uniform": rng.uniform(-1.02, 1.02, size=20000),
        "half_zero": half_zero / half_zero.max() * 1.1,
    }


@pytest.mark.parametrize("dist", ["laplace_outliers", "uniform"])
def test_entropy_matches_reference(dist):
    stats = _stats(_distributions()[dist])
    expected = reference_entropy_bins(stats.hist)
    assert entropy_bins(stats.hist) == expected
    amax = amax_from_stats(stats, "entropy")
    assert amax == float(np.float32(min(expected * stats.bin_width, stats.absmax)))


@pytest.mark.parametrize("dist", sorted(_distributions()))
def test_entropy_matches_reference_coarse(dist):
    """The same data binned 4x coarser (512 bins): the algorithm is the same, the slow reference 10x faster."""
    hist = _stats(_distributions()[dist]).hist.reshape(-1, 4).sum(axis=1)
    assert entropy_bins(hist) == reference_entropy_bins(hist)


def test_entropy_matches_reference_with_gaps_and_outliers():
    """A sparse histogram: outliers landing in empty last chunks give Q = 0 where P > 0 (divergence +inf)."""
    rng = np.random.default_rng(3)
    hist = np.zeros(NUM_BINS, dtype=np.int64)
    hist[:200] = rng.integers(0, 50, size=200)
    hist[rng.integers(200, 560, size=12)] = 1
    hist[560] = 2
    assert entropy_bins(hist) == reference_entropy_bins(hist)
    assert entropy_bins(hist) < 561


def test_entropy_is_fast():
    rng = np.random.default_rng(0)
    stats = _stats(rng.standard_t(3, size=100000) * 1.7)
    entropy_bins(stats.hist)
    start = time.perf_counter()
    for _ in range(10):
        entropy_bins(stats.hist)
    assert (time.perf_counter() - start) / 10 < 0.03


def test_methods_order_on_heavy_tailed_data():
    rng = np.random.default_rng(1)
    stats = _stats(rng.laplace(size=200000))
    minmax = amax_from_stats(stats, "minmax")
    assert minmax == float(np.float32(stats.absmax))
    assert amax_from_stats(stats, "entropy") < minmax
    assert amax_from_stats(stats, "percentile", 100.0) == minmax
    p9999 = amax_from_stats(stats, "percentile", 99.99)
    p99 = amax_from_stats(stats, "percentile", 99.0)
    assert p99 < p9999 <= minmax
    mse = amax_from_stats(stats, "mse")
    assert p99 * 0.5 < mse < minmax


def test_percentile_is_upper_bin_edge():
    hist = np.zeros(NUM_BINS, dtype=np.int64)
    hist[[10, 20, 30, 40]] = 25
    stats = TensorStats("t", absmax=1.0, count=100, hist=hist, hist_range=2.0)
    assert amax_from_stats(stats, "percentile", 50.0) == 21 * 2.0 / NUM_BINS
    assert amax_from_stats(stats, "percentile", 51.0) == 31 * 2.0 / NUM_BINS


def _quant_mse(values, amax):
    step = amax / 127.0
    return float(np.mean((np.clip(np.round(values / step), -127, 127) * step - values) ** 2))


def test_mse_is_near_the_true_optimum():
    rng = np.random.default_rng(2)
    values = np.concatenate([rng.normal(size=100000), rng.normal(size=50) * 6.0]).astype(np.float32)
    stats = _stats(values)
    mse = amax_from_stats(stats, "mse")
    grid = np.linspace(1.0, stats.absmax, 200)
    best = min(_quant_mse(values, a) for a in grid)
    assert _quant_mse(values, mse) <= 1.05 * best
    assert mse < stats.absmax
    assert mse_bins(stats.hist) >= 128


@pytest.mark.parametrize("method", METHODS)
def test_zero_tensor_gets_positive_amax(method):
    stats = _stats(np.zeros(64))
    amax = amax_from_stats(stats, method)
    assert amax == MIN_AMAX > 0
    assert Scales({"t": amax}, {"t": method}).scale("t") > 0


@pytest.mark.parametrize("method", METHODS)
def test_few_bins_fall_back_to_absmax(method):
    """Fewer than 128 bins below the last nonzero one (data far below the range): entropy and mse use absmax."""
    hist = np.zeros(NUM_BINS, dtype=np.int64)
    hist[[0, 50]] = [5, 1]
    stats = TensorStats("t", absmax=0.05, count=6, hist=hist, hist_range=2.0)
    amax = amax_from_stats(stats, method, 99.0)
    assert 0 < amax <= float(np.float32(0.05))
    if method in ("entropy", "mse", "minmax"):
        assert amax == float(np.float32(0.05))


def test_scales_deterministic_float32():
    rng = np.random.default_rng(5)
    stats = {name: _stats(rng.normal(size=1000) * (i + 1), name) for i, name in enumerate(["b", "a", "c"])}
    scales = scales_from_stats(stats, "entropy")
    assert list(scales.amax) == ["a", "b", "c"]
    assert all(float(np.float32(v)) == v for v in scales.amax.values())
    assert scales.scale("a") == np.float32(scales.amax["a"] / 127.0)
    assert scales_from_stats(stats, "entropy") == scales
    merged = scales.merged(Scales({"a": 1.0, "z": 2.0}, {"a": "cache", "z": "cache"}))
    assert merged.amax["a"] == 1.0 and merged.method["b"] == "entropy" and merged.amax["z"] == 2.0


def test_unknown_method():
    with pytest.raises(ConfigError, match="histogram"):
        amax_from_stats(_stats([1.0]), "histogram")
