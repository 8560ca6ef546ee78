"""Layer input statistics, AdaRound and bias correction (calib/layer_inputs.py, rounding.py, weight_quant.py) on
layers and graphs built in code, checked against ONNX Runtime."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper, numpy_helper

from tests import models
from trtglm.calib import rounding
from trtglm.calib.layer_inputs import collect_layer_inputs, input_rows, linear_layer
from trtglm.calib.weight_quant import decide_weights
from trtglm.passes.normals import expected_value, input_means
from trtglm.passes import PassContext
from trtglm.passes.fold_batchnorm import fold_batchnorm
from trtglm.passes.insert_qdq import insert_qdq, plan_qdq


def _conv_model(c_in=6, c_out=6, k=3, group=1, stride=1, dilation=1, pad=1, seed=0) -> onnx.ModelProto:
    b = models._Builder(seed)
    y = b.conv("input", c_in, c_out, k=k, name="conv", group=group, strides=[stride] * 2,
               dilations=[dilation] * 2)
    node = b.nodes[-1]
    for a in node.attribute:
        if a.name == "pads":
            a.ints[:] = [pad] * 4
    models._rename_output(b, y, "output")
    return b.model("conv", [models._input("input", ("N", c_in, 11, 9))],
                   [models._input("output", ("N", c_out, None, None))])


@pytest.mark.parametrize("geometry", [dict(), dict(group=6, c_out=6), dict(group=2, c_out=4, stride=2),
                                      dict(k=5, dilation=2, pad=3, c_in=3, c_out=5)])
def test_input_rows_times_weight_rows_is_the_convolution(geometry):
    model = _conv_model(**geometry)
    x = np.random.default_rng(1).standard_normal((2, geometry.get("c_in", 6), 11, 9)).astype(np.float32)
    ref = models.run_ort(model, {"input": x})[0]
    graph = gs.import_onnx(model)
    conv = next(n for n in graph.nodes if n.op == "Conv")
    layer = linear_layer(conv)
    rows, w = input_rows(layer, x), layer.rows(conv.inputs[1].values)
    out = np.matmul(rows, w.transpose(0, 2, 1))  # (groups, N*positions, out/groups)
    g, o = w.shape[0], w.shape[0] * w.shape[1]
    n, _, ho, wo = ref.shape
    got = out.reshape(g, n, ho, wo, -1).transpose(1, 0, 4, 2, 3).reshape(n, o, ho, wo)
    bias = conv.inputs[2].values.reshape(1, -1, 1, 1)
    np.testing.assert_allclose(got + bias, ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(layer.from_rows(w), conv.inputs[1].values)


def _correlated_layer(groups, out, k, seed):
    """Weights with large opposite taps and inputs whose neighbouring elements are nearly equal: the depthwise
    filters after BatchNorm folding that round-to-nearest handles worst."""
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((groups, out, k)).astype(np.float32) * rng.uniform(0.1, 10, (groups, out, 1))
    base = rng.standard_normal((groups, 4096, 1))
    x = base + 0.1 * rng.standard_normal((groups, 4096, k))
    hessian = np.matmul(x.transpose(0, 2, 1), x) / x.shape[1]
    return rows.astype(np.float32), hessian


@pytest.mark.parametrize("shape", [(16, 1, 9), (1, 24, 32), (1, 8, 200), (3, 5, 12)])
def test_adaround_is_never_worse_than_nearest_on_its_objective(shape):
    for seed in range(3):
        rows, hessian = _correlated_layer(*shape, seed)
        near = rounding.round_layer(rows, hessian, 127.0, "nearest")
        ada = rounding.round_layer(rows, hessian, 127.0, "adaround", iterations=300)
        per_row_near = rounding.row_errors(near.q, rows, near.scale, hessian)
        per_row_ada = rounding.row_errors(ada.q, rows, ada.scale, hessian)
        assert (per_row_ada <= per_row_near + 1e-12).all()
        assert ada.error < 0.7 * near.error  # and on correlated inputs it is clearly better
        assert np.abs(ada.q).max() <= 127 and np.abs(ada.q - rows / ada.scale[..., None]).max() < 1.0


def _biased_model(seed=0) -> onnx.ModelProto:
    """conv1 -> BN -> Relu -> conv2 whose weights all sit 0.4 of a step above a level: nearest rounding lowers every
    weight, so conv2's output drops by 0.4 s sum(x) on the positive ReLU inputs: a planted output bias."""
    b = models._Builder(seed)
    h = b.act(b.bn(b.conv("input", 3, 8, name="conv1"), 8), "Relu")
    y = b.conv(h, 8, 4, name="conv2")
    w = next(t for t in b.inits if t.name == "conv2.weight")
    values = numpy_helper.to_array(w)
    step = np.abs(values).reshape(4, -1).max(axis=1) / 127.0
    levels = np.clip(np.rint(values / step[:, None, None, None]), -126, 126)
    levels[np.abs(values) == np.abs(values).reshape(4, -1).max(axis=1)[:, None, None, None]] = 127
    planted = np.where(np.abs(levels) < 127, levels + 0.4, levels) * step[:, None, None, None]
    w.CopyFrom(numpy_helper.from_array(planted.astype(np.float32), w.name))
    models._rename_output(b, y, "output")
    model = b.model("biased", [models._input("input", ("N", 3, 8, 8))], [models._input("output", ("N", 4, 8, 8))])
    _match_batchnorm(model)
    return model


def _match_batchnorm(model: onnx.ModelProto) -> None:
    """Set the BatchNorm's running statistics to those of its input on N(0, 1) images, as training leaves them:
    then its output is N(beta, gamma^2) per channel, which analytic bias correction assumes."""
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(helper.make_tensor_value_info(bn.input[0], onnx.TensorProto.FLOAT, None))
    x = np.random.default_rng(7).standard_normal((256, 3, 8, 8)).astype(np.float32)
    pre = models.run_ort(probe, {"input": x})[-1]
    inits = {t.name: t for t in model.graph.initializer}
    for name, value in ((bn.input[3], pre.mean(axis=(0, 2, 3))), (bn.input[4], pre.var(axis=(0, 2, 3)))):
        inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))


def _prepared(model):
    graph = gs.import_onnx(model)
    ctx = PassContext()
    fold_batchnorm(graph, ctx)
    fp32 = onnx.shape_inference.infer_shapes(gs.export_onnx(graph))  # as the pipeline hands it over: typed
    return gs.import_onnx(fp32), fp32, ctx


def _mean_output_error(fp32, decisions, feeds, correct_biases=True):
    graph = gs.import_onnx(fp32)
    plan = plan_qdq(graph)
    assert sorted(plan.weights) == ["conv1.weight", "conv2.weight"]
    plan.activations = []  # weights only: the planted bias is the weights'
    insert_qdq(graph, plan, {}, (), decisions.weights, decisions.biases if correct_biases else None)
    quantized = gs.export_onnx(graph)
    ref, got = models.run_ort(fp32, feeds)[0], models.run_ort(quantized, feeds)[0]
    return np.abs((got - ref).mean(axis=(0, 2, 3))).max()


@pytest.mark.parametrize("correction", ["empirical", "analytic"])
def test_bias_correction_removes_a_planted_output_bias(correction):
    model = _biased_model()
    graph, fp32, ctx = _prepared(model)
    rng = np.random.default_rng(0)
    calib = [{"input": rng.standard_normal((16, 3, 8, 8)).astype(np.float32)} for _ in range(4)]
    nodes = [n.name for n in graph.nodes if n.op == "Conv"]
    means = input_means(graph, [n.inputs[0].name for n in graph.nodes if n.op == "Conv"], ctx.normals)
    decisions = decide_weights(graph, fp32, nodes, iter(calib), {}, "nearest", correction, {}, means)
    assert set(decisions.biases) == ({"conv1", "conv2"} if correction == "empirical" else {"conv2"})
    held_out = {"input": rng.standard_normal((32, 3, 8, 8)).astype(np.float32)}
    before = _mean_output_error(fp32, decisions, held_out, correct_biases=False)
    after = _mean_output_error(fp32, decisions, held_out)
    assert before > 0.01  # the planted bias is there (outputs have mean |y| ~0.3)...
    assert after < before / (10 if correction == "empirical" else 3)  # ...and correction removes it


def test_analytic_means_follow_batchnorm_through_relu6_and_equalized_bounds():
    normals = {"z": (np.array([0.0, 1.0, 10.0]), np.array([1.0, 0.5, 0.0]))}
    graph = gs.Graph()
    z = gs.Variable("z", np.float32)
    clipped = gs.Variable("c", np.float32)
    graph.nodes.append(gs.Node("Clip", inputs=[z, gs.Constant("lo", np.array(0.0, np.float32)),
                                                gs.Constant("hi", np.array(6.0, np.float32))], outputs=[clipped]))
    got = expected_value(clipped, normals)
    rng = np.random.default_rng(0)
    samples = np.clip(normals["z"][0] + normals["z"][1] * rng.standard_normal((200000, 3)), 0, 6)
    np.testing.assert_allclose(got, samples.mean(axis=0), atol=5e-3)
    assert got[2] == 6.0  # a constant channel above the bound
    relu_out, bounded = gs.Variable("r", np.float32), gs.Variable("m", np.float32)
    graph.nodes.append(gs.Node("Relu", inputs=[z], outputs=[relu_out]))
    graph.nodes.append(gs.Node("Min", inputs=[relu_out, gs.Constant("b", np.array([[[0.5]], [[6.0]], [[3.0]]],
                                                                                np.float32))], outputs=[bounded]))
    samples = np.clip(normals["z"][0] + normals["z"][1] * rng.standard_normal((200000, 3)), 0, [0.5, 6.0, 3.0])
    np.testing.assert_allclose(expected_value(bounded, normals), samples.mean(axis=0), atol=5e-3)


def test_layer_statistics_are_exact_sums_for_a_gemm():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 7)).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 7])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 5])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    layer = linear_layer(next(n for n in gs.import_onnx(model).nodes))
    xs = [rng.standard_normal((8, 7)).astype(np.float32) for _ in range(3)]
    stats = collect_layer_inputs(model, [layer], ({"x": x} for x in xs), {"x": 2.0})["fc"]
    x = np.concatenate(xs)
    np.testing.assert_allclose(stats.hessian[0], x.T @ x / len(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.mean[0], x.mean(axis=0), rtol=1e-5, atol=1e-6)
    scale = np.float32(2.0 / 127)
    np.testing.assert_allclose(stats.quantized_mean[0], (np.clip(np.rint(x / scale), -127, 127) * scale).mean(0),
                               rtol=1e-5, atol=1e-6)


def test_sequential_correction_matches_the_fp32_means_layer_by_layer():
    """With activations quantized too, noise through the ReLU shifts conv2's mean; the sequential correction
    measures each layer on the quantized model with the earlier corrections applied: on the calibration feeds the
    last layer's per-channel means then equal FP32's, and held-out data keeps most of the gain."""
    from trtglm.calib.weight_quant import correct_sequentially

    graph, fp32, ctx = _prepared(_biased_model())
    rng = np.random.default_rng(0)
    calib = [{"input": rng.standard_normal((16, 3, 8, 8)).astype(np.float32)} for _ in range(4)]
    nodes = [n.name for n in graph.nodes if n.op == "Conv"]
    decisions = decide_weights(graph, fp32, nodes, iter(calib), {}, "nearest", "empirical", {}, {})

    def quantized(biases):
        g = gs.import_onnx(fp32)
        insert_qdq(g, plan_qdq(g), {"input": 3.0, "relu_out": 1.0}, (), decisions.weights, biases)
        return gs.export_onnx(g)

    corrected = correct_sequentially(fp32, quantized(decisions.biases), nodes, calib, decisions.biases)
    assert set(corrected) == {"conv1", "conv2"}

    def mean_error(model, feeds):
        return max(np.abs((models.run_ort(model, f)[0] - models.run_ort(fp32, f)[0]).mean(axis=(0, 2, 3))).max()
                   for f in feeds)

    local, sequential = quantized(decisions.biases), quantized(corrected)
    assert mean_error(sequential, [{"input": np.concatenate([c["input"] for c in calib])}]) < 1e-4
    held_out = [{"input": rng.standard_normal((64, 3, 8, 8)).astype(np.float32)}]
    assert mean_error(sequential, held_out) < 0.5 * mean_error(local, held_out)


@pytest.mark.parametrize("kwargs,message", [
    (dict(weight_rounding="adaround", calib_cache="c.cache"), "need calibration data"),
    (dict(bias_correction="sequential", calib_cache="c.cache"), "need calibration data"),
    (dict(bias_correction="analytic", int8=False, calib=None), "applies to INT8 builds"),
    (dict(weight_rounding="stochastic"), "choose nearest or adaround"),
    (dict(bias_correction="mean"), "choose none, empirical, sequential or analytic"),
])
def test_bad_weight_options_are_one_line_errors(kwargs, message):
    from pathlib import Path

    from trtglm.config import BuildConfig
    from trtglm.errors import ConfigError

    base = dict(model=Path("m.onnx"), calib=Path("calib"))
    if "calib_cache" in kwargs:
        base.pop("calib")
        kwargs = dict(kwargs, calib_cache=Path(kwargs["calib_cache"]))
    with pytest.raises(ConfigError, match=message):
        BuildConfig(**{**base, **kwargs})
