"""Cross-layer equalization on graphs built in code: the function is kept (ReLU, ReLU6, depthwise), the ranges
equalized, dead channels survive."""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from tests import models
from trtglm.passes.equalize import equalize


def _chain(*, depthwise: bool = False, act: str = "Relu", dead: bool = False, pad: bool = False,
           seed: int = 0) -> onnx.ModelProto:
    """input (N,4,8,8) -> Conv(4->8) -> act -> [DWConv(8) -> act ->] Conv(8->6) -> output; channel ranges that
    differ by orders of magnitude, as after BatchNorm folding. `pad`: the depthwise convolution's padding is a Pad
    node in front of it, as TensorFlow-style "same" padding exports."""
    b = models._Builder(seed)
    h = b.conv("input", 4, 8, name="conv1")
    w1 = next(t for t in b.inits if t.name == "conv1.weight")
    values = numpy_helper.to_array(w1) * np.geomspace(0.01, 30, 8).reshape(8, 1, 1, 1)
    if dead:
        values[3] = 0.0
    w1.CopyFrom(numpy_helper.from_array(values.astype(np.float32), w1.name))
    h = b.act(h, act)
    if depthwise:
        if pad:
            h = b.op("Pad", [h, b.const("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))], name="pad")
        h = b.act(b.conv(h, 8, 8, name="dw", group=8), act)
        if pad:
            next(a for a in b.nodes[-2].attribute if a.name == "pads").ints[:] = [0, 0, 0, 0]
    y = b.conv(h, 8, 6, name="conv2")
    models._rename_output(b, y, "output")
    return b.model("chain", [models._input("input", ("N", 4, 8, 8))], [models._input("output", ("N", 6, 8, 8))])


def _weights(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("depthwise", [False, True])
def test_equalization_keeps_the_function_and_equalizes_the_ranges(depthwise):
    model = _chain(depthwise=depthwise)
    out, count, log = models.apply_pass(model, equalize)
    assert count == (2 if depthwise else 1), log
    feeds = models.random_inputs(model, batch=2)
    assert models.max_rel_err(models.run_ort(model, feeds), models.run_ort(out, feeds)) <= 1e-4
    w = _weights(out)
    first_next = w["dw.weight"] if depthwise else w["conv2.weight"]
    r1 = np.abs(w["conv1.weight"]).reshape(8, -1).max(axis=1)
    r2 = np.abs(first_next).reshape(8, -1).max(axis=1) if depthwise else np.abs(first_next).max(axis=(0, 2, 3))
    before = np.abs(_weights(model)["conv1.weight"]).reshape(8, -1).max(axis=1)
    assert before.max() / before.min() > 1000  # the planted spread
    np.testing.assert_allclose(r1, r2, rtol=1e-3)  # equalized (chains: after the sweeps converge)
    assert r1.max() / r1.min() < before.max() / before.min() / 10


@pytest.mark.parametrize("depthwise,pad", [(False, False), (True, False), (True, True)])
def test_relu6_pairs_keep_the_function_through_per_channel_bounds(depthwise, pad):
    """Clip(0, 6) becomes Relu + Min(6 / s): exact even where the activations saturate, which a plain ReLU6 after
    rescaling would not be. A zero Pad between the activation and the next Conv is stepped through."""
    model = _chain(act="Clip", depthwise=depthwise, pad=pad)
    out, count, log = models.apply_pass(model, equalize)
    assert count == (2 if depthwise else 1), log
    ops = [n.op_type for n in out.graph.node]
    assert "Clip" not in ops and ops.count("Min") == count and ops.count("Relu") == count
    feeds = {k: v * 20 for k, v in models.random_inputs(model, batch=2).items()}  # most channels saturate
    ref = models.run_ort(model, feeds)
    assert models.max_rel_err(ref, models.run_ort(out, feeds)) <= 1e-4
    bounds = [t for t in out.graph.initializer if t.name.endswith("_bound")]
    assert len(bounds) == count and not np.allclose(numpy_helper.to_array(bounds[0]), 6.0)
    for t in bounds:  # the same graph with the bounds left at 6 computes something else
        t.CopyFrom(numpy_helper.from_array(np.full(numpy_helper.to_array(t).shape, 6.0, np.float32), t.name))
    assert models.max_rel_err(ref, models.run_ort(out, feeds)) > 1e-2


def test_a_clip_with_another_lower_bound_is_skipped_and_logged():
    model = _chain(act="Clip")
    low = next(t for t in model.graph.initializer if t.name == "clip.min")
    low.CopyFrom(numpy_helper.from_array(np.array(-1.0, np.float32), low.name))
    out, count, log = models.apply_pass(model, equalize)
    assert count == 0 and any("does not clip at 0" in line for line in log)
    np.testing.assert_array_equal(_weights(out)["conv1.weight"], _weights(model)["conv1.weight"])


def test_a_dead_channel_keeps_its_scale_and_nothing_is_divided_by_zero():
    model = _chain(dead=True)
    out, count, _ = models.apply_pass(model, equalize)
    assert count == 1
    w = _weights(out)
    assert np.isfinite(w["conv1.weight"]).all() and np.isfinite(w["conv2.weight"]).all()
    np.testing.assert_array_equal(w["conv2.weight"][:, 3], _weights(model)["conv2.weight"][:, 3])
    feeds = models.random_inputs(model, batch=2)
    assert models.max_rel_err(models.run_ort(model, feeds), models.run_ort(out, feeds)) <= 1e-4


def test_shared_weights_are_left_alone():
    model = _chain()
    conv2 = next(n for n in model.graph.node if n.name == "conv2")
    extra = helper.make_node("Identity", [conv2.input[1]], ["w_copy"], name="reads_weight")
    model.graph.node.append(extra)
    model.graph.output.append(helper.make_tensor_value_info("w_copy", onnx.TensorProto.FLOAT, [6, 8, 3, 3]))
    _, count, log = models.apply_pass(model, equalize)
    assert count == 0 and any("initializers of its own" in line for line in log)


def test_build_with_equalize(tmp_path):
    """`trtglm build --equalize` on a CNN: the pass runs after BatchNorm folding and the FP32 function holds."""
    import json

    from click.testing import CliRunner

    from trtglm.cli import main

    model = _chain(depthwise=True)
    onnx.save(model, tmp_path / "m.onnx")
    (tmp_path / "calib").mkdir()
    np.save(tmp_path / "calib" / "input.npy", np.random.default_rng(0).standard_normal((32, 4, 8, 8)).astype(np.float32))
    result = CliRunner().invoke(main, ["build", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "calib"),
                                       "--out", str(tmp_path / "o"), "--equalize"])
    assert result.exit_code == 0, result.output
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert "equalize 2" in result.output
    assert rep["accuracy"]["fp32_optimized_max_rel_err"] <= 1e-4
