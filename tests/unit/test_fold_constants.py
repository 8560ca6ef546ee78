"""fold_constants: weight arithmetic and static shape subgraphs become initializers; graph outputs stay."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.models import (apply_pass, build_attention, build_conv_bn_relu, build_mlp, max_rel_err, ops, random_inputs,
                          run_ort)
from trtglm.passes import fold_constants

SHAPE_OPS = {"Shape", "Gather", "Concat"}


def check(model: onnx.ModelProto, expected_count: int | None = None) -> onnx.ModelProto:
    feeds = random_inputs(model)
    out, count, _ = apply_pass(model, fold_constants)
    if expected_count is not None:
        assert count == expected_count
    assert count == len(model.graph.node) - len(out.graph.node)
    assert [(o.name, o.type) for o in out.graph.output] == [(o.name, o.type) for o in model.graph.output]
    assert max_rel_err(run_ort(model, feeds), run_ort(out, feeds)) < 1e-6
    return out


def _static_batch(model: onnx.ModelProto, batch: int = 2) -> onnx.ModelProto:
    for value in list(model.graph.input) + list(model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = batch
    return model


def test_attention_dynamic_batch_folds_static_seq_dim():
    model = build_attention(mask="int")
    out = check(model, expected_count=2)  # Gather(Shape(x), 1) and its Unsqueeze: S is static
    assert ops(out).count("Gather") == 1 and "Shape" in ops(out)  # N is dynamic: stays computed


def test_attention_static_batch_folds_whole_shape_subgraph():
    out = check(_static_batch(build_attention(mask="int")))
    assert not SHAPE_OPS & set(ops(out))
    inits = {t.name for t in out.graph.initializer}
    reshapes = [n for n in out.graph.node if n.op_type == "Reshape"]
    assert reshapes and all(n.input[1] in inits for n in reshapes)
    assert "Cast" in ops(out)  # the mask comes from a graph input: not constant


def test_constant_node_and_weight_transpose_folded():
    w = numpy_helper.from_array(np.arange(32, dtype=np.float32).reshape(4, 8) / 32, "w_t")
    nodes = [helper.make_node("Constant", [], ["w_c"], name="const", value=w),
             helper.make_node("Transpose", ["w_c"], ["w"], name="transpose", perm=[1, 0]),
             helper.make_node("MatMul", ["input", "w"], ["output"], name="fc")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    out = check(model, expected_count=2)
    assert ops(out) == ["MatMul"]
    assert out.graph.node[0].input[1] in {t.name for t in out.graph.initializer}


def test_shape_of_intermediate_tensor_without_value_info():
    """Shape(Relu(x)) with static x folds although the graph carries no shape for Relu's output."""
    nodes = [helper.make_node("Relu", ["input"], ["r"], name="relu"),
             helper.make_node("Shape", ["r"], ["s"], name="shape"),
             helper.make_node("Reshape", ["r", "s"], ["output"], name="reshape")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [2, 3, 4])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [2, 3, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert not model.graph.value_info
    out = check(model, expected_count=1)
    assert ops(out) == ["Relu", "Reshape"]


def test_constant_graph_output_keeps_name_and_stays_computed():
    nodes = [helper.make_node("Relu", ["input"], ["output"], name="relu"),
             helper.make_node("Shape", ["input"], ["input_shape"], name="shape")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [2, 3]),
                               helper.make_tensor_value_info("input_shape", TensorProto.INT64, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    out = check(model, expected_count=0)  # Shape became a Constant node: same count, still an output
    assert sorted(ops(out)) == ["Constant", "Relu"]
    assert "input_shape" not in {t.name for t in out.graph.initializer}
    assert np.array_equal(run_ort(out, random_inputs(model))[1], [2, 3])
    out2, count, _ = apply_pass(out, fold_constants)
    assert count == 0 and sorted(ops(out2)) == ["Constant", "Relu"]


def test_dequantize_of_constant_weight_is_not_folded():
    """TensorRT needs the weight's DequantizeLinear in the graph to run the layer in INT8."""
    inits = [numpy_helper.from_array(np.ones((8, 4), np.int8), "w_q"),
             numpy_helper.from_array(np.array(0.1, np.float32), "w_scale")]
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"], name="dq"),
             helper.make_node("MatMul", ["input", "w"], ["output"], name="fc")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    out = check(model, expected_count=0)
    assert ops(out) == ["DequantizeLinear", "MatMul"]


def test_nothing_to_fold():
    for model in (build_conv_bn_relu(), build_mlp()):
        out = check(model, expected_count=0)
        assert ops(out) == ops(model)


def test_idempotent():
    once, _, _ = apply_pass(_static_batch(build_attention(mask="int")), fold_constants)
    twice, count, _ = apply_pass(once, fold_constants)
    assert count == 0 and ops(twice) == ops(once)
