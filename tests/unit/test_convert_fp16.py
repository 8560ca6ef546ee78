"""convert_fp16 on graphs built in code and on MiniLM: types (I/O FP32, kept ops FP32, Q/DQ), ORT FP16 vs FP32.

Tolerance: outputs within 1e-2 of the largest |FP32 output| (models.max_rel_err). FP16 rounds each stored tensor
to 11 significant bits (relative 4.9e-4); a block stores ~10-20 tensors in a chain, so honest FP16 error stays a
few 1e-3, while a real mistake (a weight flushed or scaled wrong, a mask lost, a kept op run wrong) is O(1).
"""


import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests import models
from trtglm.errors import ModelError
from trtglm.passes import DEFAULT_PIPELINE, PassContext, run_passes
from trtglm.passes.convert_fp16 import KEEP_FP32, convert_fp16

TOL = 1e-2
FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16


def _convert(model: onnx.ModelProto, opset: int = 17, pipeline: bool = False):
    graph = gs.import_onnx(model)
    ctx = PassContext(opset=opset)
    if pipeline:
        run_passes(graph, DEFAULT_PIPELINE, ctx)
        model = gs.export_onnx(graph)
    count = convert_fp16(graph, ctx)
    out = gs.export_onnx(graph)
    onnx.checker.check_model(out, full_check=True)
    return model, out, count, ctx.log


def _types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor, from ONNX shape inference (strict: a type clash raises)."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    g = inferred.graph
    types = {i.name: i.data_type for i in g.initializer}
    types.update({v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info]})
    return types


def _check_close(fp32: onnx.ModelProto, fp16: onnx.ModelProto, batch: int = 3) -> None:
    feeds = models.random_inputs(fp32, batch=batch)
    ref, got = models.run_ort(fp32, feeds), models.run_ort(fp16, feeds)
    assert [g.dtype for g in got] == [r.dtype for r in ref]
    assert models.max_rel_err(ref, got) < TOL


def _io_types(model: onnx.ModelProto) -> list[tuple[str, int]]:
    return [(v.name, v.type.tensor_type.elem_type) for v in [*model.graph.input, *model.graph.output]]


def _check_types(before: onnx.ModelProto, after: onnx.ModelProto) -> dict[str, int]:
    """I/O types unchanged, kept ops read and write FP32, every other float tensor is FP16."""
    types = _types(after)
    assert _io_types(after) == _io_types(before)
    for node in after.graph.node:
        names = [*node.input, *node.output] if node.op_type in KEEP_FP32 else []
        assert all(types[n] != FLOAT16 for n in names if n), node.name
    return types


def _gelu(model: onnx.ModelProto) -> onnx.ModelProto:
    """Append the erf GELU exporters write, 0.5 * y * (1 + erf(y / sqrt(2))), after `model`'s only output."""
    g = model.graph
    y = g.output[0].name
    g.node[-1].output[0] = "pre_gelu"
    for node in g.node:
        node.input[:] = ["pre_gelu" if i == y else i for i in node.input]
    consts = {"sqrt2": np.sqrt(2.0), "one": 1.0, "half": 0.5}
    g.initializer.extend(numpy_helper.from_array(np.array(v, np.float32), k) for k, v in consts.items())
    g.node.extend([helper.make_node("Div", ["pre_gelu", "sqrt2"], ["g_div"], name="gelu.div"),
                   helper.make_node("Erf", ["g_div"], ["g_erf"], name="gelu.erf"),
                   helper.make_node("Add", ["g_erf", "one"], ["g_add"], name="gelu.add"),
                   helper.make_node("Mul", ["pre_gelu", "g_add"], ["g_mul"], name="gelu.mul"),
                   helper.make_node("Mul", ["g_mul", "half"], [y], name="gelu.half")])
    onnx.checker.check_model(model)
    return model


def test_cnn_classifier():
    before, after, count, _ = _convert(models.build_cnn_classifier(), pipeline=True)
    assert count > 0 and "BatchNormalization" not in models.ops(after)
    types = _check_types(before, after)
    for node in after.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            assert {types[n] for n in [*node.input, *node.output]} == {FLOAT16}, node.name
    assert models.ops(after).count("Cast") == 2  # one at the input, one at the output
    _check_close(before, after)


@pytest.mark.parametrize("mask_value", [-10000.0, float(np.finfo(np.float32).min)])
def test_attention_block_with_gelu(mask_value):
    model = _gelu(models.build_attention(mask="int"))
    neg = next(i for i in model.graph.initializer if i.name == "mask.neg")
    neg.CopyFrom(numpy_helper.from_array(np.array(mask_value, np.float32), "mask.neg"))
    before, after, count, log = _convert(model)
    types = _check_types(before, after)
    assert count > 0
    softmax = next(n for n in after.graph.node if n.op_type == "Softmax")
    assert types[softmax.input[0]] == FLOAT
    ln = next(n for n in after.graph.node if n.op_type == "LayerNormalization")
    assert types[ln.input[0]] == types[ln.output[0]] == FLOAT16
    assert any(a.name == "stash_type" and a.i == 1 for a in ln.attribute)
    erf = next(n for n in after.graph.node if n.op_type == "Erf")
    assert types[erf.input[0]] == FLOAT16  # Erf stays FP16: bounded, and MiniLM's cosine is the same either way
    neg = numpy_helper.to_array(next(i for i in after.graph.initializer if i.name == "mask.neg"))
    assert neg.dtype == np.float16 and float(neg) == max(mask_value, -65504.0)
    assert any("mask.neg" in line and "clipped" in line for line in log) == (mask_value < -65504)
    _check_close(before, after)


def _qdq_model(opset: int) -> onnx.ModelProto:
    """x (N,16) -> Q/DQ -> MatMul(DQ(int8 W, per-column scales)) -> Add bias -> Relu -> y (N,8)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    w_scale = (np.abs(w).max(axis=0) / 127).astype(np.float32)
    inits = [numpy_helper.from_array(np.round(w / w_scale).astype(np.int8), "w_q"),
             numpy_helper.from_array(w_scale, "w_scale"),
             numpy_helper.from_array(np.zeros(8, np.int8), "w_zp"),
             numpy_helper.from_array(np.array(4.0 / 127, np.float32), "x_scale"),
             numpy_helper.from_array(np.array(0, np.int8), "x_zp"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32) * 0.1, "bias")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"], name="q"),
             helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"], name="dq"),
             helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w_dq"], name="w_dq", axis=1),
             helper.make_node("MatMul", ["x_dq", "w_dq"], ["mm"], name="mm"),
             helper.make_node("Add", ["mm", "bias"], ["pre"], name="bias_add"),
             helper.make_node("Relu", ["pre"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", FLOAT, ["N", 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("opset", [17, 19])
def test_int8_qdq(opset):
    before, after, count, _ = _convert(_qdq_model(opset), opset=opset)
    types = _check_types(before, after)
    assert types["w_q"] == types["x_q"] == TensorProto.INT8 and types["w_zp"] == TensorProto.INT8
    scale_type = FLOAT16 if opset >= 19 else FLOAT  # opset < 19 Q/DQ accept only FP32 scales
    assert types["w_scale"] == types["x_scale"] == types["x_dq"] == types["w_dq"] == scale_type
    assert types["mm"] == FLOAT16
    _check_close(before, after)


def test_constants_clipped_and_flushed_are_logged():
    values = np.array([1e6, -np.finfo(np.float32).max, 1e-10, 0.5, -np.inf], np.float32)
    graph = helper.make_graph([helper.make_node("Add", ["x", "c"], ["y"], name="add")], "clip",
                              [helper.make_tensor_value_info("x", FLOAT, [5])],
                              [helper.make_tensor_value_info("y", FLOAT, [5])],
                              [numpy_helper.from_array(values, "c")])
    _, after, count, log = _convert(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    c = numpy_helper.to_array(after.graph.initializer[0])
    assert count == 2  # c, and y's FP16 twin
    assert c.tolist() == [65504.0, -65504.0, 0.0, 0.5, -np.inf]  # an explicit -inf is meant: kept
    assert any("'c': 2 value(s)" in line and "clipped" in line for line in log)
    assert any("'c': 1 nonzero value(s)" in line and "flush" in line for line in log)


def _dtype_ops_model() -> onnx.ModelProto:
    """ConstantOfShape, Cast(int -> float), EyeLike and float shape math (Shape -> Cast -> Mul -> Cast to int)."""
    inits = [numpy_helper.from_array(np.array([4, 4], np.int64), "shape"),
             numpy_helper.from_array(np.array([2.0, 0.5], np.float32), "half")]
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["ones"], name="cos",
                              value=numpy_helper.from_array(np.array([1.0], np.float32))),
             helper.make_node("Cast", ["ids"], ["ids_f"], name="cast", to=FLOAT),
             helper.make_node("EyeLike", ["ids"], ["eye"], name="eye", dtype=FLOAT),
             helper.make_node("Add", ["x", "ones"], ["a"], name="add"),
             helper.make_node("Mul", ["a", "ids_f"], ["b"], name="mul"),
             helper.make_node("Add", ["b", "eye"], ["c"], name="add_eye"),
             helper.make_node("Shape", ["ids_f"], ["s"], name="shape_of"),
             helper.make_node("Cast", ["s"], ["s_f"], name="cast_shape", to=FLOAT),
             helper.make_node("Mul", ["s_f", "half"], ["s_half"], name="shape_mul"),
             helper.make_node("Cast", ["s_half"], ["s_int"], name="cast_int", to=TensorProto.INT64),
             helper.make_node("Reshape", ["c", "s_int"], ["y"], name="reshape")]
    graph = helper.make_graph(nodes, "dtype_ops", [helper.make_tensor_value_info("x", FLOAT, [4, 4]),
                                                   helper.make_tensor_value_info("ids", TensorProto.INT64, [4, 4])],
                              [helper.make_tensor_value_info("y", FLOAT, [8, 2])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_dtype_attributes_and_shape_math():
    before, after, _, _ = _convert(_dtype_ops_model())
    types = _check_types(before, after)
    attrs = {n.name: {a.name: helper.get_attribute_value(a) for a in n.attribute} for n in after.graph.node}
    assert attrs["cos"]["value"].data_type == FLOAT16
    assert attrs["eye"]["dtype"] == FLOAT and types["eye"] == FLOAT  # kept FP32 (exact 0/1), cast where used
    assert attrs["cast"]["to"] == FLOAT16 and types["ids_f"] == FLOAT16
    assert types["s_f"] == types["s_half"] == types["half"] == FLOAT  # shape math stays exact
    _check_close(before, after)


def test_native_attention_gets_fp32_softmax():
    q, k, v = (helper.make_tensor_value_info(n, FLOAT, [2, 2, 8, 4]) for n in "qkv")
    graph = helper.make_graph([helper.make_node("Attention", ["q", "k", "v"], ["y"], name="attn")], "attn",
                              [q, k, v], [helper.make_tensor_value_info("y", FLOAT, [2, 2, 8, 4])])
    before, after, _, _ = _convert(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]), 23)
    attn = next(n for n in after.graph.node if n.op_type == "Attention")
    assert {a.name: a.i for a in attn.attribute}["softmax_precision"] == FLOAT
    assert _check_types(before, after)["y_fp16"] == FLOAT16
    _check_close(before, after)



def test_rotary_angles_stay_fp32():
    """position x frequency -> Cos/Sin (HF's rotary embedding) stays FP32 from the integer positions on: at
    position 3000 FP16's step is 2 radians. The tables, in [-1, 1], go FP16 where the activation reads them."""
    half = 8
    inv_freq = (1.0 / 10000 ** (np.arange(half) / half)).astype(np.float32)
    nodes = [helper.make_node("Unsqueeze", ["pos", "last"], ["pos3"], name="unsqueeze"),
             helper.make_node("Cast", ["pos3"], ["posf"], to=FLOAT, name="cast"),
             helper.make_node("Mul", ["posf", "inv_freq"], ["freqs"], name="freqs"),
             helper.make_node("Concat", ["freqs", "freqs"], ["emb"], axis=-1, name="emb"),
             helper.make_node("Cos", ["emb"], ["cos"], name="cos"),
             helper.make_node("Sin", ["emb"], ["sin"], name="sin"),
             helper.make_node("Mul", ["x", "cos"], ["xc"], name="xc"),
             helper.make_node("Mul", ["x", "sin"], ["xs"], name="xs"),
             helper.make_node("Add", ["xc", "xs"], ["y"], name="y")]
    graph = helper.make_graph(nodes, "rope", [helper.make_tensor_value_info("pos", TensorProto.INT64, ["B", "S"]),
                                               helper.make_tensor_value_info("x", FLOAT, ["B", "S", 2 * half])],
                              [helper.make_tensor_value_info("y", FLOAT, ["B", "S", 2 * half])],
                              [numpy_helper.from_array(inv_freq, "inv_freq"),
                               numpy_helper.from_array(np.array([-1], np.int64), "last")])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    before, after, _, _ = _convert(model)
    types = _check_types(before, after)
    assert [types[t] for t in ("posf", "freqs", "emb", "cos", "sin")] == [FLOAT] * 5
    assert types["xc"] == FLOAT16  # the Muls with the activation run in FP16
    rng = np.random.default_rng(0)
    feeds = {"pos": np.arange(3000, 3016, dtype=np.int64).reshape(2, 8),
             "x": rng.standard_normal((2, 8, 2 * half)).astype(np.float32)}
    ref, got = models.run_ort(before, feeds), models.run_ort(after, feeds)
    assert models.max_rel_err(ref, got) < TOL

def test_idempotent_and_fp16_graph_left_alone():
    _, once, _, _ = _convert(models.build_attention(mask="int"))
    _, twice, count, _ = _convert(once)
    assert count == 0 and models.ops(twice) == models.ops(once)
    graph = helper.make_graph([helper.make_node("Softmax", ["x"], ["y"], name="softmax")], "half",
                              [helper.make_tensor_value_info("x", FLOAT16, [2, 4])],
                              [helper.make_tensor_value_info("y", FLOAT16, [2, 4])])
    _, out, count, log = _convert(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert count == 0 and models.ops(out) == ["Softmax"] and "no FP32 tensor" in log[-1]


def test_subgraph_refused_with_node_name():
    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["z"])], "b", [],
                               [helper.make_tensor_value_info("z", FLOAT, [2])])
    graph = helper.make_graph([helper.make_node("If", ["c"], ["y"], name="branchy", then_branch=branch,
                                                else_branch=branch)], "if",
                              [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                               helper.make_tensor_value_info("x", FLOAT, [2])],
                              [helper.make_tensor_value_info("y", FLOAT, [2])])
    with pytest.raises(ModelError, match="'branchy'.*subgraph"):
        convert_fp16(gs.import_onnx(helper.make_model(graph)), PassContext())


def test_minilm_sentence_embedding_cosine(minilm):
    before, after, _, _ = _convert(onnx.load(str(minilm / "minilm.onnx")), pipeline=True)
    _check_types(before, after)
    feeds = {k: np.load(minilm / "eval" / f"{k}.npy")[:32] for k in ("input_ids", "attention_mask", "token_type_ids")}
    ref, got = models.run_ort(before, feeds)[0], models.run_ort(after, feeds)[0]
    cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    assert got.dtype == np.float32 and cos.min() > 0.9999
