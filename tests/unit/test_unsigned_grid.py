"""The unsigned grid: non-negative activations quantized as x - amax/2 on all 255 int8 levels, the shift folded
into the consumers' biases (passes/insert_qdq, calib/methods.activation_grid)."""

import numpy as np
import onnx
import onnx.numpy_helper
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper

from tests import models
from trtglm.calib.layer_inputs import quantized_sums
from trtglm.calib.methods import activation_grid, amax_from_stats
from trtglm.calib.stats import TensorStats
from trtglm.config import PrecisionPolicy
from trtglm.passes import PassContext
from trtglm.passes.explicit_pads import explicit_pads
from trtglm.passes.insert_qdq import insert_qdq, plan_qdq

C = 4


def _const(name, values):
    values = np.asarray(values, dtype=np.float32)
    return helper.make_tensor(name, TensorProto.FLOAT, values.shape, values.ravel())


def _branchy_model(seed=0) -> onnx.ModelProto:
    """conv0 feeds one branch per case: which of them may take the shift, and which may not."""
    rng = np.random.default_rng(seed)
    w = lambda *shape: _const(f"w{len(inits)}", rng.standard_normal(shape) * 0.5)  # noqa: E731
    inits, nodes = [], []

    def conv(name, x, shape, **attrs):
        inits.append(w(*shape))
        inits.append(_const(f"b_{name}", rng.standard_normal(shape[0]) * 0.1))
        nodes.append(helper.make_node("Conv", [x, inits[-2].name, inits[-1].name], [name], name=name, **attrs))
        return name

    conv("c0", "x", (C, 3, 1, 1))
    nodes += [helper.make_node("Relu", ["c0"], ["relu"], name="relu"),
              helper.make_node("Clip", ["c0", "lo", "hi"], ["relu6"], name="clip6"),
              helper.make_node("Clip", ["c0", "neg", "hi"], ["clip_signed"], name="clip_signed"),
              helper.make_node("Pad", ["relu6", "pads"], ["relu6_pad"], name="pad"),
              helper.make_node("Relu", ["c0"], ["relu_b"], name="relu_b"),
              helper.make_node("Relu", ["c0"], ["relu_c"], name="relu_c"),
              helper.make_node("Relu", ["c0"], ["relu_d"], name="relu_d"),
              helper.make_node("GlobalAveragePool", ["relu_d"], ["pool"], name="gap"),
              helper.make_node("Flatten", ["pool"], ["flat"], name="flatten")]
    inits += [_const("lo", 0.0), _const("hi", 6.0), _const("neg", -1.0),
              helper.make_tensor("pads", TensorProto.INT64, [8], [0, 0, 1, 1, 0, 0, 1, 1])]
    conv("pointwise", "relu", (C, C, 1, 1))  # ReLU -> 1x1: unsigned
    conv("depthwise", "relu6_pad", (C, 1, 3, 3), group=C)  # ReLU6 -> zero Pad -> depthwise: unsigned
    conv("signed", "clip_signed", (C, C, 1, 1))  # Clip at -1: signed
    conv("implicit_pad", "relu_b", (C, C, 3, 3), pads=[1, 1, 1, 1])  # pads attribute would pad x - c with 0
    conv("also_added", "relu_c", (C, C, 1, 1))
    nodes.append(helper.make_node("Add", ["also_added", "relu_c"], ["sum"], name="residual"))  # Add reads it too
    inits += [_const("fc_w", rng.standard_normal((3, C))), _const("fc_b", rng.standard_normal(3))]
    nodes.append(helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc", transB=1))
    outputs = ["pointwise", "depthwise", "signed", "implicit_pad", "sum", "logits"]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 6, 6])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits)
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_only_non_negative_tensors_whose_readers_take_the_shift_are_unsigned():
    graph = gs.import_onnx(_branchy_model())
    plan = plan_qdq(graph)
    assert plan.unsigned == ["flat", "relu", "relu6_pad"]
    assert {"clip_signed", "relu_b", "relu_c"} <= set(plan.activations) - set(plan.unsigned)
    assert plan.signed == {"relu_b": "read by Conv 'implicit_pad', which pads implicitly (its zeros would stand "
                                     "for x = amax/2)",
                           "relu_c": "read by Add 'residual', which cannot take the shift in a bias"}
    assert plan_qdq(gs.import_onnx(_branchy_model()), PrecisionPolicy(unsigned=False)).unsigned == []


def _quantized(model, amax, unsigned=True):
    graph = gs.import_onnx(model)
    plan = plan_qdq(graph, PrecisionPolicy(unsigned=unsigned))
    insert_qdq(graph, plan, {n: amax.get(n, 4.0) for n in plan.activations})
    out = gs.export_onnx(graph)
    onnx.checker.check_model(out)
    return out


def test_the_int8_layer_computes_exactly_its_quantized_input_times_its_quantized_weights():
    """Each output equals W_q * Q(x) + b, with Q on the unsigned grid (zero padding included) and W_q the layer's
    dequantized weights: the folded shift is exact, not an approximation."""
    model = _branchy_model()
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 3, 6, 6)).astype(np.float32) * 2}
    amax = {"relu": 3.0, "relu6_pad": 5.0, "flat": 1.5}
    q = _quantized(model, amax)
    outputs = [o.name for o in model.graph.output]
    got = dict(zip(outputs, models.run_ort(q, feeds)))
    names = ["relu", "relu6", "flat"]  # as the quantized model computes them (its first conv is INT8 too)
    probe = onnx.ModelProto()
    probe.CopyFrom(q)
    probe.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    values = dict(zip(outputs + names, models.run_ort(probe, feeds)))
    graph = gs.import_onnx(q)
    nodes = {n.name: n for n in graph.nodes}

    def wq(name):
        dq = nodes[name].inputs[1].inputs[0]
        scale = dq.inputs[1].values.reshape((-1,) + (1,) * (dq.inputs[0].values.ndim - 1))
        return dq.inputs[0].values.astype(np.float64) * scale

    def fake(x, a):
        scale, centre = activation_grid(a, unsigned=True)
        return centre + scale * np.clip(np.rint((x - centre) / scale), -127, 127)

    inits = {t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    bias = {n: inits[f"b_{n}"] for n in ("pointwise", "depthwise")}
    xq = fake(values["relu"], 3.0)
    want = np.einsum("oc,nchw->nohw", wq("pointwise")[:, :, 0, 0], xq) + bias["pointwise"][None, :, None, None]
    np.testing.assert_allclose(got["pointwise"], want, rtol=1e-5, atol=1e-5)
    padded = np.pad(fake(values["relu6"], 5.0), ((0, 0), (0, 0), (1, 1), (1, 1)))  # the zeros stay exact
    kernel = wq("depthwise")[:, 0]
    want = sum(padded[:, :, i:i + 6, j:j + 6] * kernel[None, :, i, j, None, None] for i in range(3) for j in range(3))
    np.testing.assert_allclose(got["depthwise"], want + bias["depthwise"][None, :, None, None], rtol=1e-5, atol=1e-5)
    fc = wq("fc")[:, :]
    want = fake(values["flat"], 1.5) @ fc.T + inits["fc_b"]
    np.testing.assert_allclose(got["logits"], want, rtol=1e-5, atol=1e-5)


def test_unsigned_grid_halves_the_error_of_a_relu_output():
    model = _branchy_model()
    feeds = {"x": np.random.default_rng(2).standard_normal((2, 3, 6, 6)).astype(np.float32) * 2}
    errors = {}
    for unsigned in (True, False):
        q = _quantized(model, {"relu": 20.0}, unsigned)  # nothing clipped: rounding error alone
        q.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                              for n in ("relu", "relu_dequantized"))
        relu, dequantized = models.run_ort(q, feeds)[-2:]
        centre = activation_grid(20.0, unsigned)[1]
        errors[unsigned] = float(np.sqrt(np.mean((dequantized + centre - relu)[relu > 0] ** 2)))  # zeros: exact
    assert 0.4 * errors[False] < errors[True] < 0.6 * errors[False]


def test_sub_goes_in_front_of_the_pad_which_pads_with_minus_the_centre():
    graph = gs.import_onnx(_quantized(_branchy_model(), {"relu6_pad": 5.0}))
    pad = next(n for n in graph.nodes if n.op == "Pad")
    sub = pad.inputs[0].inputs[0]
    scale, centre = activation_grid(5.0, unsigned=True)
    assert sub.op == "Sub" and float(sub.inputs[1].values) == centre
    assert float(pad.inputs[2].values) == -centre and -centre / scale == -127.0
    assert pad.outputs[0].outputs[0].op == "QuantizeLinear"


def test_finer_grid_moves_mse_and_entropy_thresholds_out():
    stats = TensorStats("relu")
    stats.update(np.abs(np.random.default_rng(0).standard_normal(200_000)).astype(np.float32))
    for method in ("mse", "entropy"):
        assert amax_from_stats(stats, method, unsigned=True) > amax_from_stats(stats, method)
    assert amax_from_stats(stats, "minmax", unsigned=True) == amax_from_stats(stats, "minmax")


@pytest.mark.parametrize("unsigned", [True, False])
def test_layer_statistics_quantize_like_the_qdq_graph(unsigned):
    rows = np.abs(np.random.default_rng(3).standard_normal((1, 50, 6))).astype(np.float32) * 2
    rows[0, :5] = 0.0
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Gemm", ["r", "w"], ["y"])],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [50, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [50, 6])], [_const("w", np.eye(6))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    g = gs.import_onnx(onnx.shape_inference.infer_shapes(model))
    plan = plan_qdq(g, PrecisionPolicy(unsigned=unsigned))
    assert plan.unsigned == (["r"] if unsigned else [])
    insert_qdq(g, plan, {"r": 3.0})
    dequantized = models.run_ort(gs.export_onnx(g), {"x": rows[0]})[0]  # identity weights are exact in int8
    np.testing.assert_allclose(quantized_sums(rows, 3.0, unsigned)[0], dequantized.sum(axis=0), rtol=1e-5)


def _build_cnn(tmp_path, *flags):
    """`trtglm build` of the bundled CNN with `flags`: (what it printed, its report.json, its Q/DQ model)."""
    import json

    from click.testing import CliRunner

    from trtglm.cli import main

    model, calib = tmp_path / "cnn.onnx", tmp_path / "calib"
    if not model.exists():
        onnx.save(models.build_cnn_classifier(), model)
        calib.mkdir()
        np.save(calib / "input.npy", np.random.default_rng(0).standard_normal((32, 3, 8, 8)).astype(np.float32))
    out = tmp_path / ("out" + "".join(flags))
    result = CliRunner().invoke(main, ["build", str(model), "--calib", str(calib), "--out", str(out), *flags])
    assert result.exit_code == 0, result.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["accuracy"]["outputs"]["logits"]["sim"]["cosine"] > 0.99
    return result.output, rep, onnx.load(out / "model.int8.qdq.onnx")


def test_build_reports_its_unsigned_tensors_and_no_unsigned_turns_them_off(tmp_path):
    found = {}
    for flag in ("--unsigned", "--no-unsigned"):
        _, rep, qdq = _build_cnn(tmp_path, flag)
        subs = [n for n in qdq.graph.node if n.op_type == "Sub"]
        found[flag] = (rep["quantization"]["unsigned_activations"], len(subs))
    assert found["--unsigned"][0] and found["--unsigned"][1] == len(found["--unsigned"][0])
    assert found["--no-unsigned"] == ([], 0)


def _explicit(model):
    graph = gs.import_onnx(model)
    ctx = PassContext(opset=17)
    count = explicit_pads(graph, ctx)
    return gs.export_onnx(graph), count, ctx.log


def test_explicit_pads_keep_the_function_and_bring_a_padded_relu_onto_the_unsigned_grid():
    model = _branchy_model()
    rewritten, count, log = _explicit(model)
    assert count == 1  # 'implicit_pad'; relu_c is read by the residual Add as well, x is signed
    feeds = {"x": np.random.default_rng(4).standard_normal((2, 3, 6, 6)).astype(np.float32)}
    for want, got in zip(models.run_ort(model, feeds), models.run_ort(rewritten, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    graph = gs.import_onnx(rewritten)
    conv = next(n for n in graph.nodes if n.name == "implicit_pad")
    assert not any(conv.attrs["pads"]) and conv.inputs[0].inputs[0].op == "Pad"
    plan = plan_qdq(graph)
    assert conv.inputs[0].name in plan.unsigned and "relu_b" not in plan.signed
    assert set(plan.signed) == {"relu_c"}


def test_a_conv_keeps_implicit_padding_when_its_input_is_signed_or_read_otherwise():
    model = _branchy_model()
    graph = gs.import_onnx(model)
    for node in graph.nodes:
        if node.name == "also_added":  # relu_c: read by a padded Conv and by the residual Add
            node.attrs["pads"] = [1, 1, 1, 1]
            node.inputs[1].values = np.tile(node.inputs[1].values, (1, 1, 3, 3)) / 9
        if node.name == "signed":  # a Clip at -1
            node.attrs["pads"] = [1, 1, 1, 1]
            node.inputs[1].values = np.tile(node.inputs[1].values, (1, 1, 3, 3)) / 9
    _, count, log = _explicit(gs.export_onnx(graph))
    assert count == 1
    assert "explicit_pads: 'relu_c' keeps implicit padding: also read by Add 'residual', which could not take the " \
           "unsigned grid's shift" in log
    assert "explicit_pads: 'clip_signed' keeps implicit padding: not non-negative by construction" in log


def test_int8_conv_behind_an_explicit_pad_pads_exactly():
    """The rewritten layer's INT8 output is W_q * pad(Q(x), 0) + b: the Pad fills with -c on the centred grid."""
    model, _, _ = _explicit(_branchy_model())
    feeds = {"x": np.random.default_rng(5).standard_normal((2, 3, 6, 6)).astype(np.float32) * 2}
    q = _quantized(model, {"relu_b_padded": 4.5})
    probe = onnx.ModelProto()
    probe.CopyFrom(q)
    probe.graph.output.extend([helper.make_tensor_value_info("relu_b", TensorProto.FLOAT, None)])
    outputs = [o.name for o in probe.graph.output]
    values = dict(zip(outputs, models.run_ort(probe, feeds)))
    graph = gs.import_onnx(q)
    conv = next(n for n in graph.nodes if n.name == "implicit_pad")
    dq = conv.inputs[1].inputs[0]
    w = dq.inputs[0].values.astype(np.float64) * dq.inputs[1].values.reshape(-1, 1, 1, 1)
    scale, centre = activation_grid(4.5, unsigned=True)
    xq = centre + scale * np.clip(np.rint((values["relu_b"] - centre) / scale), -127, 127)
    padded = np.pad(xq, ((0, 0), (0, 0), (1, 1), (1, 1)))
    want = sum(np.einsum("oc,nchw->nohw", w[:, :, i, j], padded[:, :, i:i + 6, j:j + 6]) for i in range(3)
               for j in range(3))
    bias = next(t for t in model.graph.initializer if t.name == "b_implicit_pad")
    want += onnx.numpy_helper.to_array(bias)[None, :, None, None]
    np.testing.assert_allclose(values["implicit_pad"], want, rtol=1e-5, atol=1e-5)
    pad = next(n for n in graph.nodes if n.op == "Pad" and n.outputs[0].name == "relu_b_padded")
    assert float(pad.inputs[2].values) == -centre and pad.inputs[0].inputs[0].op == "Sub"


def test_build_explicit_pads_flag(tmp_path):
    unsigned = {}
    for flags in ((), ("--explicit-pads",)):
        output, rep, _ = _build_cnn(tmp_path, *flags)
        assert ("explicit_pads 1" in output) == bool(flags)
        unsigned[flags] = rep["quantization"]["unsigned_activations"]
    assert len(unsigned[("--explicit-pads",)]) == len(unsigned[()]) + 1


def test_unsigned_grid_stays_off_for_fp16_on_onnx_runtime_cpu(tmp_path):
    """ONNX Runtime's FP16 convolutions accumulate in FP16, where a shifted bias cancels against its centred input."""
    _, rep, qdq = _build_cnn(tmp_path, "--fp16", "--target", "ort-cpu")
    assert rep["quantization"]["unsigned_activations"] == []
    assert not [n for n in qdq.graph.node if n.op_type == "Sub"]
    assert any("unsigned grid off: --fp16 --target ort-cpu" in line for line in rep["pass_log"])
    _, rep, _ = _build_cnn(tmp_path, "--fp16")  # TensorRT's INT8 layers accumulate in int32: the grid stays on
    assert rep["quantization"]["unsigned_activations"]
