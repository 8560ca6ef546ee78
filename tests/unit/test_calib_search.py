"""Row samples and the per-tensor searches: SmoothQuant alpha and calibration method chosen by output error."""

import numpy as np

from trtglm.calib.methods import METHODS
from trtglm.calib.rows import RowSample
from trtglm.calib.search import ALPHAS, choose_alpha, choose_method, output_error
from trtglm.calib.stats import TensorStats


def _stream(batches, capacity=64, indices=None):
    sample = RowSample("t", capacity)
    stats = TensorStats("t")
    for i, b in zip(indices if indices is not None else range(len(batches)), batches):
        sample.update(b, i)
        stats.update(b)
    return sample, stats


def _sorted_rows(rows):
    return rows[np.lexsort(rows.T[::-1])]


def test_row_sample_keeps_everything_until_full_then_a_bounded_deterministic_sample():
    rng = np.random.default_rng(0)
    small = [rng.standard_normal((2, 5, 8)).astype(np.float32) for _ in range(3)]
    sample, _ = _stream(small, capacity=64)
    np.testing.assert_array_equal(_sorted_rows(sample.rows),
                                  _sorted_rows(np.concatenate([b.reshape(-1, 8) for b in small])))
    # 20 batches of 100 rows whose first column is the batch index: a fair sample reaches the late batches
    big = [np.full((100, 8), i, dtype=np.float32) for i in range(20)]
    a, _ = _stream(big, capacity=64)
    b, _ = _stream(big, capacity=64)
    assert a.rows.shape == (64, 8) and a.seen == 2000
    np.testing.assert_array_equal(a.rows, b.rows)
    assert a.rows[:, 0].max() >= 15 and len(np.unique(a.rows[:, 0])) >= 8


def test_row_sample_is_the_same_for_any_partition_and_merge_order():
    """Bottom-k by a hash of (batch, row): shards merged in any order give the same rows in the same order as one
    stream, and a shard merged twice (a retried worker) changes nothing."""
    rng = np.random.default_rng(3)
    batches = [rng.standard_normal((7, 12, 8)).astype(np.float32) for _ in range(30)]
    whole, _ = _stream(batches, capacity=100)
    for trial in range(20):
        order = rng.permutation(30)
        cuts = np.sort(rng.choice(np.arange(1, 30), size=rng.integers(1, 6), replace=False))
        shards = [_stream([batches[i] for i in part], 100, part)[0] for part in np.split(order, cuts)]
        first, *rest = rng.permutation(len(shards))
        merged = shards[first]
        for j in rest:
            merged = merged.merge(shards[j])
        np.testing.assert_array_equal(merged.rows, whole.rows)
        assert merged.seen == whole.seen
        again = merged.merge(shards[first])  # a shard's rows once more: the same keys, nothing new
        np.testing.assert_array_equal(again.rows, whole.rows)


def test_choose_alpha_smooths_an_outlier_channel_and_not_a_flat_one():
    rng = np.random.default_rng(1)
    w = [rng.standard_normal((32, 24)).astype(np.float32)]
    x = rng.standard_normal((4, 64, 32)).astype(np.float32)
    x[..., 3] *= 80.0  # one outlier channel, as after a transformer's LayerNorm
    sample, stats = _stream([x], capacity=256)
    choice = choose_alpha(stats, sample.rows, w, "minmax")
    assert choice.value in ALPHAS
    assert choice.errors[None] > 10 * choice.errors[choice.value]
    flat = rng.standard_normal((4, 64, 32)).astype(np.float32)
    sample, stats = _stream([flat], capacity=256)
    choice = choose_alpha(stats, sample.rows, w, "minmax")
    assert choice.errors[choice.value] <= choice.errors[None]
    assert choice.errors[choice.value] == min(choice.errors.values())


def test_choose_method_returns_the_least_error_and_output_error_is_relative():
    rng = np.random.default_rng(2)
    w = [rng.standard_normal((16, 8)).astype(np.float32)]
    x = rng.standard_t(3, size=(8, 32, 16)).astype(np.float32)  # heavy tails: the methods disagree
    sample, stats = _stream([x], capacity=256)
    choice = choose_method(stats, sample.rows, w)
    assert set(choice.errors) == set(METHODS)
    assert choice.errors[choice.value] == min(choice.errors.values())
    rows = sample.rows
    assert output_error(rows, w, float(np.abs(rows).max())) < 5e-3  # minmax on heavy tails: coarse but unclipped
    assert output_error(rows, w, 1e-3) > 0.5  # everything clipped to almost zero


def test_auto_calibrates_convolution_inputs_by_their_own_error_and_keeps_entropy_elsewhere():
    """Tensors read only by convolutions get mse under --calib-method auto; a residual Add's input keeps TensorRT's
    entropy; an explicit method applies to all."""
    import onnx_graphsurgeon as gs

    from tests import models
    from trtglm.calib.search import methods_for
    from trtglm.calib.stats import TensorStats

    graph = gs.import_onnx(models.build_residual_block(activation="Relu"))
    conv_inputs = [t.name for t in graph.tensors().values() if isinstance(t, gs.Variable) and t.outputs
                   and all(n.op == "Conv" and n.inputs[0] is t for n in t.outputs)]
    add_inputs = [t.name for t in graph.tensors().values() if isinstance(t, gs.Variable) and t.outputs
                  and all(n.op == "Add" for n in t.outputs)]
    assert conv_inputs and add_inputs
    rng = np.random.default_rng(0)
    relu6 = np.clip(rng.exponential(0.4, (64, 8, 8, 8)), 0, 6).astype(np.float32)
    stats = {}
    for name in conv_inputs + add_inputs:
        stats[name] = TensorStats(name)
        stats[name].update(relu6)
    chosen = methods_for(graph, stats, {}, "auto", 99.99, {}, frozenset())
    assert {chosen[n].value for n in conv_inputs} == {"mse"}
    assert {chosen[n].value for n in add_inputs} == {"entropy"}
    assert methods_for(graph, stats, {}, "entropy", 99.99, {}, frozenset())[conv_inputs[0]].value == "entropy"
