"""to_plugin_ops / from_plugin_ops on graphs built in code.

Each case checks three things: the plugin graph (TrtglmResidualNorm nodes, attributes, domain, onnx.checker); the
ONNX fallback (from_plugin_ops) against the original graph on ONNX Runtime; and the numpy reference of the plugin
(what the CUDA kernel computes), fed the plugin node's inputs, against the values the original graph computes for
the plugin node's outputs. The last one ties the op's definition to the subgraph it replaces.
"""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests import models
from trtglm.passes import PassContext
from trtglm.passes.plugin_ops import DOMAIN, MAX_HIDDEN, OP, from_plugin_ops, to_plugin_ops
from trtglm.plugins import NAMESPACE, VERSION
from trtglm.plugins.reference import norm as ref

H = 16
SCALE = 0.02  # y ~ N(0, 2): y / SCALE reaches past +-127, so the int8 clamp is exercised too


def _block(norm="layer", opset=17, residual="stream", quant=None, beta=True, axis=-1, gamma="const",
           hidden=H, dtype=TensorProto.FLOAT, smooth=False):
    """x, r (N, 4, hidden) -> [s = x + r] -> norm(s) [-> QuantizeLinear -> DequantizeLinear] -> y [+ s].

    norm: "layer" (LayerNormalization), "rms" (RMSNormalization, opset 23), "rms_decomposed" (Pow, ReduceMean,
    Add, Sqrt, Div, Mul gamma). residual: "stream" (s also feeds the final Add), "graph_output" (s is an output),
    "unused" (only the norm reads s), "broadcast" (s = x + bias[hidden]: not a residual), None (the norm reads x).
    quant: None, "int8" (zero point int8 0) or "uint8" (no zero point). smooth: a per-channel Mul after the norm
    (SmoothQuant's 1/s where it could not be folded into a native norm).
    """
    rng = np.random.default_rng(0)
    shape = ["N", 4, hidden]

    def const(name, value, elem=dtype):
        value = np.asarray(value)
        inits.append(helper.make_tensor(name, elem, value.shape, value.astype(np.float32).reshape(-1).tolist())
                     if elem == TensorProto.BFLOAT16 else numpy_helper.from_array(value.astype(
                         helper.tensor_dtype_to_np_dtype(elem)), name))
        return name

    inits, nodes = [], []
    inputs = [helper.make_tensor_value_info("x", dtype, shape), helper.make_tensor_value_info("r", dtype, shape)]
    g_shape = [4, hidden] if axis == 1 else [hidden]
    if gamma == "input":
        inputs.append(helper.make_tensor_value_info("gamma", dtype, g_shape))
    else:
        const("gamma", rng.uniform(0.5, 2, g_shape) if gamma == "const" else [1.5])
    const("beta", rng.standard_normal(g_shape))
    s = "x"
    if residual == "broadcast":
        nodes.append(helper.make_node("Add", ["x", const("bias", rng.standard_normal(hidden))], ["s"]))
        s = "s"
    elif residual is not None:
        nodes.append(helper.make_node("Add", ["x", "r"], ["s"]))
        s = "s"
    if norm == "layer":
        nodes.append(helper.make_node("LayerNormalization", [s, "gamma"] + (["beta"] if beta else []), ["n"],
                                      axis=axis, epsilon=1e-5))
    elif norm == "rms":
        nodes.append(helper.make_node("RMSNormalization", [s, "gamma"], ["n"], axis=axis, epsilon=1e-6))
    else:
        nodes += [helper.make_node("Pow", [s, const("two", np.float32(2))], ["sq"]),
                  helper.make_node("ReduceMean", ["sq", const("axes", [axis], TensorProto.INT64)], ["var"],
                                   keepdims=1) if opset >= 18 else
                  helper.make_node("ReduceMean", ["sq"], ["var"], axes=[axis], keepdims=1),
                  helper.make_node("Add", ["var", const("eps", np.float32(1e-6))], ["ve"]),
                  helper.make_node("Sqrt", ["ve"], ["std"]), helper.make_node("Div", [s, "std"], ["normed"]),
                  helper.make_node("Mul", ["normed", "gamma"], ["n"])]
    y = "n"
    if smooth:
        nodes.append(helper.make_node("Mul", ["n", const("smooth", rng.uniform(0.5, 2, hidden))], ["nm"]))
        y = "nm"
    if quant:
        zero = [const("zp", np.int8(0), TensorProto.INT8)] if quant == "int8" else []
        nodes += [helper.make_node("QuantizeLinear", [y, const("scale", np.float32(SCALE))] + zero, ["q"]),
                  helper.make_node("DequantizeLinear", ["q", "scale"] + zero, ["dq"])]
        y = "dq"
    if residual == "stream":
        nodes.append(helper.make_node("Add", [s, y], ["y"]))
    else:
        nodes.append(helper.make_node("Identity", [y], ["y"]))
    outputs = [helper.make_tensor_value_info("y", dtype, shape)]
    if residual == "graph_output":
        outputs.append(helper.make_tensor_value_info("s", dtype, shape))
    for i, n in enumerate(nodes):
        n.name = f"n{i}"
    graph = helper.make_graph(nodes, "block", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return onnx.shape_inference.infer_shapes(model)


# --- helpers -------------------------------------------------------------------------------------------------


def _plugin_nodes(model):
    return [n for n in model.graph.node if n.op_type == OP]


def _attrs(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _run(model, feeds, names=()):
    """Run `model` on ORT; return {name: value} for its outputs and for the intermediate tensors `names`."""
    model = onnx.shape_inference.infer_shapes(model)
    infos = {v.name: v for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]}
    outs = [o.name for o in model.graph.output]
    extra = [n for n in dict.fromkeys(names) if n not in outs and n not in {i.name for i in model.graph.initializer}]
    model.graph.output.extend(infos[n] for n in extra)
    return dict(zip(outs + extra, models.run_ort(model, feeds), strict=True))


def _assert_int8_close(expected, got, y_over_scale):
    """Equal, or off by one where y / out_scale is within 1e-4 of a .5 tie (float32 vs float64 rounding)."""
    diff = np.abs(expected.astype(np.int32) - got.astype(np.int32))
    tie = np.abs(np.abs(y_over_scale - np.floor(y_over_scale)) - 0.5) < 1e-4
    assert diff.max(initial=0) <= 1 and np.all(tie[diff == 1]), f"{int((diff > 0).sum())} int8 values differ"


def _to_plugin(model, opset):
    return models.apply_pass(model, to_plugin_ops, opset=opset)  # runs onnx.checker (full_check)


def _check(model, opset, expected):
    """Plugin graph as `expected` (one attribute dict per plugin node, plus 'inputs'/'outputs' name lists where
    given); the ONNX fallback and the numpy reference agree with the original graph."""
    plugin, count, log = _to_plugin(model, opset)
    nodes = _plugin_nodes(plugin)
    assert count == len(expected) == len(nodes), log
    assert any(d.domain == DOMAIN and d.version == 1 for d in plugin.opset_import)
    for node, want in zip(nodes, expected, strict=True):
        attrs = _attrs(node)
        assert node.domain == DOMAIN == "trtglm"
        assert attrs.pop("plugin_version") == VERSION.encode() and attrs.pop("plugin_namespace") == NAMESPACE.encode()
        want = dict(want)
        for key in ("inputs", "outputs"):
            if key in want:
                got = list(node.input if key == "inputs" else node.output)
                assert got[:len(want[key])] == want.pop(key), (key, got)
        assert attrs == pytest.approx(want)

    feeds = models.random_inputs(model, batch=3)
    new_constants = {i.name for i in plugin.graph.initializer}  # gamma/beta the pass made (decomposed norms)
    original = _run(model, feeds, [t for n in nodes for t in [*n.input, *n.output] if t not in new_constants])
    back, back_count, _ = models.apply_pass(plugin, from_plugin_ops, opset=opset)
    assert back_count == len(nodes) and not _plugin_nodes(back)
    assert all(d.domain != DOMAIN for d in back.opset_import)
    fallback = _run(back, feeds)
    for out in model.graph.output:
        assert fallback[out.name].dtype == original[out.name].dtype
        assert np.max(np.abs(fallback[out.name] - original[out.name]), initial=0) <= 1e-5, out.name
    _check_reference(plugin, nodes, original)

    # the fallback is in a form to_plugin_ops matches again: the same plugin nodes come back
    again, _, _ = _to_plugin(back, opset)
    assert [(_attrs(n), list(n.output)) for n in _plugin_nodes(again)] == [(_attrs(n), list(n.output)) for n in nodes]
    return plugin, log


def _check_reference(plugin, nodes, values):
    """trtglm.plugins.reference.norm.residual_norm on each plugin node's inputs gives its outputs, as computed by
    the original graph (`values`: the original run's tensors by name)."""
    inits = {i.name: numpy_helper.to_array(i) for i in plugin.graph.initializer}
    for node in nodes:
        a = _attrs(node)
        ins = [inits[n] if n in inits else values[n] for n in node.input]
        has_res, has_beta = a["has_residual"], a["has_beta"]
        x, residual = ins[0], ins[1] if has_res else None
        gamma, beta = ins[1 + has_res], ins[2 + has_res] if has_beta else None
        args = dict(residual=residual, beta=beta, kind=a["kind"], eps=a["eps"])
        y, residual_out = ref.residual_norm(x, gamma, **args, out_scale=a["out_scale"])
        got = values[node.output[0]]
        if a["out_scale"] > 0:
            assert got.dtype == np.int8
            y_float, _ = ref.residual_norm(x, gamma, **args)
            _assert_int8_close(y, got, y_float / a["out_scale"])
        else:
            assert np.max(np.abs(y - got)) <= 1e-5
        if has_res:
            np.testing.assert_array_equal(residual_out, values[node.output[1]])


# --- cases ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("residual", ["stream", "graph_output", "unused"])
def test_layernorm_residual_block(residual):
    model = _block("layer", residual=residual)
    plugin, _ = _check(model, 17, [dict(kind=1, eps=1e-5, has_residual=1, has_beta=1, out_scale=0.0,
                                        inputs=["x", "r", "gamma", "beta"], outputs=["n", "s"])])
    assert models.ops(plugin).count("Add") == (1 if residual == "stream" else 0)  # only the residual stream's Add
    if residual == "graph_output":
        assert [o.name for o in plugin.graph.output] == ["y", "s"]


def test_rmsnorm_op_opset_23():
    model = _block("rms", opset=23)
    plugin, _ = _check(model, 23, [dict(kind=0, eps=1e-6, has_residual=1, has_beta=0, out_scale=0.0,
                                        inputs=["x", "r", "gamma"], outputs=["n", "s"])])
    assert "RMSNormalization" not in models.ops(plugin)


@pytest.mark.parametrize("opset", [17, 18])  # ReduceMean axes as attribute (17), as input (18)
def test_decomposed_rmsnorm_with_residual(opset):
    model = _block("rms_decomposed", opset=opset)
    plugin, _ = _check(model, opset, [dict(kind=0, eps=1e-6, has_residual=1, has_beta=0, out_scale=0.0,
                                           inputs=["x", "r"], outputs=["n", "s"])])
    assert models.ops(plugin) == [OP, "Add"]


@pytest.mark.parametrize("norm,opset", [("layer", 17), ("rms_decomposed", 17), ("rms", 23)])
def test_int8_quantize_absorbed(norm, opset):
    model = _block(norm, opset=opset, quant="int8")
    kind, eps, beta = (1, 1e-5, 1) if norm == "layer" else (0, 1e-6, 0)
    plugin, _ = _check(model, opset, [dict(kind=kind, eps=eps, has_residual=1, has_beta=beta, out_scale=SCALE,
                                           outputs=["q", "s"])])
    assert "QuantizeLinear" not in models.ops(plugin) and "DequantizeLinear" in models.ops(plugin)


@pytest.mark.parametrize("norm,opset", [("layer", 17), ("rms_decomposed", 17)])
def test_smoothing_mul_folded_into_gamma_then_int8_absorbed(norm, opset):
    """norm -> Mul(per-channel s) -> QuantizeLinear: s folds into gamma (and beta), so the norm writes int8."""
    model = _block(norm, opset=opset, quant="int8", smooth=True)
    kind, eps, beta = (1, 1e-5, 1) if norm == "layer" else (0, 1e-6, 0)
    plugin, _ = _check(model, opset, [dict(kind=kind, eps=eps, has_residual=1, has_beta=beta, out_scale=SCALE,
                                           outputs=["q", "s"])])
    assert "Mul" not in models.ops(plugin) and "QuantizeLinear" not in models.ops(plugin)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    gamma = {i.name: numpy_helper.to_array(i) for i in plugin.graph.initializer}[_plugin_nodes(plugin)[0].input[2]]
    np.testing.assert_allclose(gamma, inits["gamma"] * inits["smooth"], rtol=1e-6)


def test_uint8_quantize_not_absorbed():
    model = _block("layer", quant="uint8")
    plugin, _ = _check(model, 17, [dict(kind=1, eps=1e-5, has_residual=1, has_beta=1, out_scale=0.0,
                                        outputs=["n", "s"])])
    assert "QuantizeLinear" in models.ops(plugin)


@pytest.mark.parametrize("residual", [None, "broadcast"])  # a bias Add broadcasts: it is no residual
@pytest.mark.parametrize("beta", [True, False])
def test_norm_without_residual(residual, beta):
    model = _block("layer", residual=residual, beta=beta)
    x = "s" if residual else "x"
    plugin, _ = _check(model, 17, [dict(kind=1, eps=1e-5, has_residual=0, has_beta=int(beta), out_scale=0.0,
                                        inputs=[x, "gamma"] + (["beta"] if beta else []), outputs=["n"])])
    assert models.ops(plugin).count("Add") == (1 if residual else 0)


@pytest.mark.parametrize("case,why", [
    ("axis", "axis 1"), ("gamma_input", "not constants"), ("gamma_size", "gamma has shape [1]"),
    ("hidden", f"> {MAX_HIDDEN}"), ("double", "dtype float64")])
def test_left_alone(case, why):
    model = {"axis": lambda: _block("layer", axis=1),
             "gamma_input": lambda: _block("layer", gamma="input"),
             "gamma_size": lambda: _block("rms_decomposed", gamma="scalar"),
             "hidden": lambda: _block("layer", hidden=MAX_HIDDEN + 1),
             "double": lambda: _block("layer", dtype=TensorProto.DOUBLE)}[case]()
    out, count, log = _to_plugin(model, 17)
    assert count == 0 and models.ops(out) == models.ops(model)
    assert any("kept" in line and why in line for line in log), log
    assert all(d.domain != DOMAIN for d in out.opset_import)


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT16, TensorProto.BFLOAT16])
@pytest.mark.parametrize("norm", ["layer", "rms_decomposed"])
def test_half_types_round_trip_type_check(dtype, norm):
    """fp16 / bf16 graphs become plugin graphs, and the fallback type-checks (eps and scale constants in the
    input's type). Structural only: ONNX Runtime's CPU kernels lack most bf16 ops."""
    model = _block(norm, dtype=dtype, quant="int8", opset=19)
    plugin, count, _ = _to_plugin(model, 19)
    scale = next(i for i in model.graph.initializer if i.name == "scale")
    stored = float(numpy_helper.to_array(scale))  # SCALE rounded to the half type, exact in the float attribute
    assert count == 1 and _attrs(_plugin_nodes(plugin)[0])["out_scale"] == stored
    graph = gs.import_onnx(plugin)
    assert from_plugin_ops(graph, PassContext(opset=19)) == 1
    onnx.checker.check_model(gs.export_onnx(graph), full_check=True)



@pytest.mark.parametrize("residual", ["stream", None])
def test_fp16_graph_that_reduces_in_fp32(residual):
    """`--fp16` keeps Pow/ReduceMean in FP32 (convert_fp16), so the decomposed RMSNorm reads its FP16 input through
    a Cast and multiplies by a Cast-back reciprocal: still one TrtglmResidualNorm on the FP16 tensors. The fallback
    normalizes in FP32 as the plugin does; against the mixed-precision original it differs by FP16 rounding."""
    from trtglm.passes.convert_fp16 import convert_fp16

    model, _, _ = models.apply_pass(_block("rms_decomposed", residual=residual, beta=False), convert_fp16, opset=17)
    assert "Cast" in models.ops(model) and "ReduceMean" in models.ops(model)
    plugin, count, log = _to_plugin(model, 17)
    nodes = _plugin_nodes(plugin)
    assert count == 1 and _attrs(nodes[0])["has_residual"] == int(residual is not None), log
    assert "Pow" not in models.ops(plugin) and "ReduceMean" not in models.ops(plugin)
    types = {v.name: v.type.tensor_type.elem_type for v in onnx.shape_inference.infer_shapes(plugin).graph.value_info}
    assert types[nodes[0].input[0]] == TensorProto.FLOAT16
    back, _, _ = models.apply_pass(plugin, from_plugin_ops, opset=17)
    feeds = models.random_inputs(model, batch=3)
    want, got = models.run_ort(model, feeds), models.run_ort(back, feeds)
    assert models.max_rel_err(want, got) < 4e-3

def test_build_with_plugin_ops_writes_the_plugin_model_and_checks_its_fallback(tmp_path):
    """`trtglm build --plugin-ops`: model.int8.qdq.plugins.onnx beside the Q/DQ model, its fallback checked on ORT."""
    import json

    from click.testing import CliRunner

    from trtglm.cli import main

    onnx.save(_block("rms_decomposed", opset=17), tmp_path / "m.onnx")
    (tmp_path / "calib").mkdir()
    rng = np.random.default_rng(0)
    for name in ("x", "r"):
        np.save(tmp_path / "calib" / f"{name}.npy", rng.standard_normal((40, 4, H)).astype(np.float32))
    result = CliRunner().invoke(main, ["build", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "calib"),
                                       "--out", str(tmp_path / "o"), "--plugin-ops"])
    assert result.exit_code == 0, result.output
    assert "plugin ops: 1 TrtglmResidualNorm in" in result.output
    plugin_ops = json.loads((tmp_path / "o" / "report.json").read_text())["engine"]["plugin_ops"]
    assert plugin_ops["ops"] == {OP: 1} and plugin_ops["fallback_max_rel_err"] < 1e-6
    assert [line.split(" -> ")[1].split(" ")[0] for line in plugin_ops["log"]] == [OP], plugin_ops["log"]
    plugin = onnx.load(tmp_path / "o" / "model.int8.qdq.plugins.onnx")
    onnx.checker.check_model(plugin, full_check=True)
    assert [n.op_type for n in plugin.graph.node].count(OP) == 1
    engine = json.loads((tmp_path / "o" / "report.json").read_text())["engine"]
    assert "model.int8.qdq.plugins.onnx" in engine["trtexec"]  # the engine is built from the plugin model
    assert "--staticPlugins=libtrtglm_plugins.so" in engine["trtexec"] and "aot" not in engine["trtexec"]
