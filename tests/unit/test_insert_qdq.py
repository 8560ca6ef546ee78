"""Q/DQ placement on graphs built in code: structure (where Q/DQ sit) and numerics (ORT before/after)."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper

from tests import models
from trtglm import runtime
from trtglm.config import PrecisionPolicy
from trtglm.passes import DEFAULT_PIPELINE, PassContext, run_passes
from trtglm.passes.insert_qdq import insert_qdq, plan_qdq


def _quantize(model: onnx.ModelProto, exclude=(), amax=None, seven_bit_ops=(), int8_attention=False):
    graph = gs.import_onnx(model)
    run_passes(graph, DEFAULT_PIPELINE, PassContext())
    plan = plan_qdq(graph, PrecisionPolicy(exclude=exclude, int8_attention=int8_attention))
    insert_qdq(graph, plan, amax or {name: 4.0 for name in plan.activations}, seven_bit_ops)
    out = gs.export_onnx(graph)
    onnx.checker.check_model(out)
    return gs.import_onnx(out), plan, out


def _producer(tensor):
    return tensor.inputs[0] if tensor.inputs else None


def _is_dq_of_q(tensor) -> bool:
    dq = _producer(tensor)
    return dq is not None and dq.op == "DequantizeLinear" and _producer(dq.inputs[0]) is not None \
        and _producer(dq.inputs[0]).op == "QuantizeLinear"


def _is_weight_dq(tensor) -> bool:
    dq = _producer(tensor)
    return dq is not None and dq.op == "DequantizeLinear" and isinstance(dq.inputs[0], gs.Constant) \
        and dq.inputs[0].values.dtype == np.int8


def test_every_conv_and_gemm_input_is_quantized_with_per_channel_weights():
    graph, _, _ = _quantize(models.build_cnn_classifier())
    convs = [n for n in graph.nodes if n.op in ("Conv", "Gemm")]
    assert convs
    for node in convs:
        assert _is_dq_of_q(node.inputs[0]), f"{node.name}: activation input not quantized"
        assert _is_weight_dq(node.inputs[1]), f"{node.name}: weight not int8 + DequantizeLinear"
        dq = _producer(node.inputs[1])
        weights = dq.inputs[0].values
        if node.op == "Conv":
            axis = 0
        else:
            axis = 0 if node.attrs.get("transB", 0) else 1
        assert dq.attrs["axis"] == axis
        assert dq.inputs[1].values.shape == (weights.shape[axis],)
        assert np.abs(weights).max() == 127  # per-channel absmax maps to the full range
        if len(node.inputs) > 2:
            assert isinstance(node.inputs[2], gs.Constant) and node.inputs[2].values.dtype == np.float32


def test_zero_points_are_int8_zero():
    graph, _, _ = _quantize(models.build_cnn_classifier())
    qdq = [n for n in graph.nodes if n.op in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq
    for node in qdq:
        zp = node.inputs[2].values
        assert zp.dtype == np.int8 and not zp.any()


def test_no_qdq_between_conv_and_its_activation():
    graph, _, _ = _quantize(models.build_residual_block())
    for node in graph.nodes:
        if node.op == "Conv":
            for consumer in node.outputs[0].outputs:
                assert consumer.op not in ("QuantizeLinear", "DequantizeLinear"), node.name
    relus = [n for n in graph.nodes if n.op == "Relu"]
    assert any(_producer(r.inputs[0]).op == "Conv" for r in relus)


@pytest.mark.parametrize("activation", ["Relu", "Clip"])
def test_residual_add_input_is_quantized(activation):
    graph, plan, _ = _quantize(models.build_residual_block(activation=activation))
    adds = [n for n in graph.nodes if n.op == "Add"]
    assert len(adds) == 1 and plan.residual_adds
    sources = sorted("conv" if _producer(t).op == "Conv" else "qdq" if _is_dq_of_q(t) else _producer(t).op
                     for t in adds[0].inputs)
    assert sources == ["conv", "qdq"]


def test_residual_stays_float_when_the_conv_it_would_fuse_into_is_kept_float():
    """TensorRT fuses the residual into the INT8 Conv that feeds the Add; with that Conv kept in float (accuracy
    budget) the residual's Q/DQ would buy nothing and only add rounding error."""
    graph = gs.import_onnx(models.build_residual_block())
    run_passes(graph, DEFAULT_PIPELINE, PassContext())
    add = next(n for n in graph.nodes if n.op == "Add")
    fused = next(t.inputs[0] for t in add.inputs if t.inputs and t.inputs[0].op == "Conv")
    first = next(n for n in graph.nodes if n.op == "Conv" and n is not fused)
    assert plan_qdq(graph).residual_adds == [add.name]
    plan = plan_qdq(graph, PrecisionPolicy(keep_float=frozenset({fused.name})))
    assert plan.residual_adds == [] and fused.name in plan.skipped
    assert plan.activations == [first.inputs[0].name]  # the block input, for the first Conv only
    plan = plan_qdq(graph, PrecisionPolicy(keep_float=frozenset({first.name})))
    assert plan.residual_adds == [add.name]


def test_one_qdq_pair_per_tensor_shared_by_consumers():
    graph, _, _ = _quantize(models.build_residual_block())
    quantized = [n.inputs[0].name for n in graph.nodes if n.op == "QuantizeLinear"]
    assert len(quantized) == len(set(quantized))
    # the block input feeds the first Conv and the skip Add through the same pair
    block_input = graph.inputs[0]
    qs = [n for n in block_input.outputs if n.op == "QuantizeLinear"]
    assert len(qs) == 1
    dq_out = qs[0].outputs[0].outputs[0].outputs[0]
    assert {n.op for n in dq_out.outputs} == {"Conv", "Add"}


def test_graph_outputs_are_not_quantized():
    for build in (models.build_cnn_classifier, models.build_mlp, models.build_attention):
        graph, _, _ = _quantize(build())
        for out in graph.outputs:
            assert out.dtype != np.int8
            assert _producer(out).op not in ("QuantizeLinear", "DequantizeLinear")


def test_attention_mask_and_integer_tensors_stay_float():
    graph, plan, _ = _quantize(models.build_attention())
    quantized = {n.inputs[0].name for n in graph.nodes if n.op == "QuantizeLinear"}
    for node in graph.nodes:
        if node.op == "Softmax":
            add = _producer(node.inputs[0])
            assert add.op == "Add"
            for t in add.inputs:
                assert not _is_dq_of_q(t)
    tensors = graph.tensors()
    for name in quantized:
        assert tensors[name].dtype in (np.float32, np.float16), name
    # mask inputs (int64 or additive float) are never quantized, nor anything computed only from them
    for inp in graph.inputs:
        if "mask" in inp.name:
            assert all(n.op != "QuantizeLinear" for n in inp.outputs)
    assert not any("mask" in name for name in plan.activations)


def test_additive_float_mask_input_is_not_an_activation():
    # x -> MatMul(W) -> scores + mask -> Softmax -> MatMul(mask-derived?) ; mask is a float graph input
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.ones(16, np.float32) * 0.1)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["scores"], name="proj"),
             helper.make_node("Add", ["scores", "mask"], ["masked"], name="add_mask"),
             helper.make_node("Softmax", ["masked"], ["probs"], name="softmax", axis=-1),
             helper.make_node("MatMul", ["probs", "mask2"], ["y"], name="mix")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]),
                                           helper.make_tensor_value_info("mask", TensorProto.FLOAT, [2, 4]),
                                           helper.make_tensor_value_info("mask2", TensorProto.FLOAT, [4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [w])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    plan = plan_qdq(gs.import_onnx(model), PrecisionPolicy(int8_attention=True))
    assert "mask" not in plan.activations
    assert {"x", "probs", "mask2"} <= set(plan.activations)
    assert "mix" in plan_qdq(gs.import_onnx(model)).skipped  # by default the BMM stays float


def test_exclude_by_op_type_and_node_name_glob():
    model = models.build_cnn_classifier()
    _, plan_all, _ = _quantize(model)
    graph, plan, _ = _quantize(model, exclude=("Gemm",))
    assert all(not _is_weight_dq(n.inputs[1]) for n in graph.nodes if n.op == "Gemm")
    assert len(plan.weights) == len(plan_all.weights) - 1
    graph, plan, _ = _quantize(model, exclude=("res.conv*",))
    convs = {n.name: _is_weight_dq(n.inputs[1]) for n in graph.nodes if n.op == "Conv"}
    assert convs == {"stem.conv": True, "res.conv1": False, "res.conv2": False}
    assert set(plan.skipped) == {"res.conv1", "res.conv2"}


def test_matmul_weight_axis_is_the_output_axis():
    graph, plan, _ = _quantize(models.build_mlp())
    for node in graph.nodes:
        if node.op == "MatMul" and _is_weight_dq(node.inputs[1]):
            dq = _producer(node.inputs[1])
            assert dq.attrs["axis"] == dq.inputs[0].values.ndim - 1


def test_seven_bit_weights_only_for_the_named_ops():
    graph, _, _ = _quantize(models.build_cnn_classifier(), seven_bit_ops=("Gemm",))
    for node in graph.nodes:
        if node.op in ("Conv", "Gemm"):
            weights = _producer(node.inputs[1]).inputs[0].values.astype(np.int32)
            assert np.abs(weights).max() == (63 if node.op == "Gemm" else 127)


def test_quantized_model_computes_close_to_fp32():
    model = models.build_cnn_classifier()
    feeds = models.random_inputs(model, batch=4)
    graph = gs.import_onnx(model)
    run_passes(graph, DEFAULT_PIPELINE, PassContext())
    plan = plan_qdq(graph)
    fp32 = gs.export_onnx(graph)
    # observe the exact absmax of every planned activation, as minmax calibration would
    probe = onnx.ModelProto()
    probe.CopyFrom(fp32)
    probe.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in plan.activations)
    values = models.run_ort(probe, feeds)
    amax = {n: float(np.abs(v).max()) for n, v in zip(plan.activations, values[len(fp32.graph.output):])}
    insert_qdq(graph, plan, amax)
    int8 = gs.export_onnx(graph)
    ref, out = models.run_ort(fp32, feeds)[0], models.run_ort(int8, feeds)[0]
    cos = (ref * out).sum() / np.linalg.norm(ref) / np.linalg.norm(out)
    assert cos > 0.99
    assert not np.allclose(ref, out, atol=1e-7)  # Q/DQ really changed the math


def test_embedding_lookup_is_an_activation_but_a_cast_mask_is_not():
    rng = np.random.default_rng(0)
    table = helper.make_tensor("table", TensorProto.FLOAT, [10, 4], rng.standard_normal(40).astype(np.float32))
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], rng.standard_normal(16).astype(np.float32))
    nodes = [helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed"),
             helper.make_node("Cast", ["ids"], ["ids_f"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["ids_f", "axes"], ["ids_f2"], name="unsq"),
             helper.make_node("Mul", ["emb", "ids_f2"], ["gated"], name="gate"),
             helper.make_node("MatMul", ["ids_f2", "row"], ["outer"], name="outer_mm"),
             helper.make_node("MatMul", ["gated", "w"], ["y"], name="proj")]
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [2])
    row = helper.make_tensor("row", TensorProto.FLOAT, [1, 4], np.ones(4, np.float32))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4]),
                               helper.make_tensor_value_info("outer", TensorProto.FLOAT, [2, 3, 4])],
                              [table, w, axes, row])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    plan = plan_qdq(gs.import_onnx(model))
    assert plan.activations == ["gated"]  # the index-derived float (ids_f2) feeding a MatMul stays float
    assert "outer_mm" in plan.skipped and set(plan.weights) == {"w"}


@pytest.mark.skipif(runtime.has_vnni(), reason="int16 saturation happens only on x86 CPUs without VNNI")
def test_seven_bit_weights_avoid_ort_saturation_on_this_cpu():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((256, 16)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16])],
                              [helper.make_tensor("w", TensorProto.FLOAT, w.shape, w.ravel())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.repeat(np.sign(w[:, :1].T), 2, axis=0).astype(np.float32)  # every product of column 0 is large
    errors = {}
    for ops in ((), ("MatMul",)):
        g = gs.import_onnx(model)
        insert_qdq(g, plan_qdq(g), {"x": 1.0}, ops)
        q = gs.export_onnx(g)
        sim = runtime.session(q, optimize=False).run(None, {"x": x})[0]
        ort_out = runtime.session(q, optimize=True).run(None, {"x": x})[0]
        errors[ops] = float(np.abs(sim - ort_out).max())
    assert errors[()] > 0.5  # ORT's INT8 kernel differs from the exact Q/DQ math: saturation
    assert errors[("MatMul",)] < 1e-3


def test_excluded_node_reads_the_float_tensor_even_when_it_is_shared():
    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], rng.standard_normal(16).astype(np.float32))
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="keep_int8"),
             helper.make_node("MatMul", ["x", "w"], ["b"], name="stay_float")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 4]),
                               helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 4])], [w])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    g = gs.import_onnx(model)
    plan = plan_qdq(g, PrecisionPolicy(exclude=("stay_*",)))
    insert_qdq(g, plan, {"x": 2.0})
    nodes = {n.name: n for n in g.nodes}
    assert _is_dq_of_q(nodes["keep_int8"].inputs[0]) and _is_weight_dq(nodes["keep_int8"].inputs[1])
    assert nodes["stay_float"].inputs[0].name == "x" and nodes["stay_float"].inputs[1].name == "w"


def _matmuls(graph):
    """name -> (activation input quantized, weight input int8) for every MatMul."""
    out = {}
    for n in graph.nodes:
        if n.op == "MatMul":
            out[n.name] = tuple(_is_dq_of_q(t) or _is_weight_dq(t) for t in n.inputs[:2])
    return out


@pytest.mark.parametrize("mask", ["add", "int"])
def test_transformer_policy_linear_layers_int8_attention_bmms_float(mask):
    graph, plan, _ = _quantize(models.build_attention(mask=mask))
    mm = _matmuls(graph)
    bmm = {name for name, n in ((n.name, n) for n in graph.nodes if n.op == "MatMul")
           if not any(_is_weight_dq(t) for t in n.inputs[:2])}
    assert len(bmm) == 2 and all(mm[name] == (False, False) for name in bmm)
    assert all(mm[name] == (True, True) for name in mm if name not in bmm)  # Q, K, V and output projections
    assert all("attention BMM" in plan.skipped[name] for name in bmm)
    assert not any(n.op in ("QuantizeLinear",) and "mask" in n.inputs[0].name for n in graph.nodes)


@pytest.mark.parametrize("mask", ["add", "int"])
def test_int8_attention_quantizes_the_bmms_but_never_the_mask(mask):
    graph, plan, _ = _quantize(models.build_attention(mask=mask), int8_attention=True)
    assert all(a and b for a, b in _matmuls(graph).values())
    softmax = next(n for n in graph.nodes if n.op == "Softmax")
    add = _producer(softmax.inputs[0])
    assert not any(_is_dq_of_q(t) for t in add.inputs)
    assert not any("mask" in name for name in plan.activations)


def test_gemv_shaped_matmul_stays_float():
    w = helper.make_tensor("w", TensorProto.FLOAT, [8, 4], np.ones(32, np.float32))
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="gemv")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 4])], [w])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    plan = plan_qdq(gs.import_onnx(model))
    assert not plan.activations and not plan.weights and "GEMV" in plan.skipped["gemv"]
