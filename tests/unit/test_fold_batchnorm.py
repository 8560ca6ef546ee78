"""fold_batchnorm: BN folded into Conv / ConvTranspose / Gemm, or lowered to Mul+Add; never left in the graph."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.models import (apply_pass, build_cnn_classifier, build_conv_bn_relu, build_conv_transpose_bn, build_gemm_bn,
                          build_residual_block, max_rel_err, ops, random_inputs, run_ort)
from trtglm.passes import fold_batchnorm

TOL = 1e-5


def check(model: onnx.ModelProto, expected_ops: list[str], expected_count: int) -> onnx.ModelProto:
    feeds = random_inputs(model, batch=3)
    out, count, _ = apply_pass(model, fold_batchnorm)
    assert count == expected_count
    assert sorted(ops(out)) == sorted(expected_ops)
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    assert max_rel_err(run_ort(model, feeds), run_ort(out, feeds)) < TOL
    return out


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def conv_weight(model: onnx.ModelProto) -> np.ndarray:
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    return initializer(model, conv.input[1])


@pytest.mark.parametrize("conv_bias", [True, False])
def test_conv_bn_folds_into_conv(conv_bias):
    out = check(build_conv_bn_relu(conv_bias=conv_bias), ["Conv", "Relu"], 1)
    conv = next(n for n in out.graph.node if n.op_type == "Conv")
    assert len(conv.input) == 3  # a bias is created when the Conv had none
    assert initializer(out, conv.input[2]).dtype == np.float32
    assert conv_weight(out).dtype == np.float32


@pytest.mark.parametrize("activation", ["Relu", "Clip"])
def test_residual_block_folds_both(activation):
    check(build_residual_block(activation=activation), ["Conv", activation, "Conv", "Add", activation], 2)


def test_cnn_classifier():
    check(build_cnn_classifier(), ["Conv", "Relu", "Conv", "Relu", "Conv", "Add", "Relu", "GlobalAveragePool",
                                   "Flatten", "Gemm"], 3)


@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_transpose_bn(group, bias):
    check(build_conv_transpose_bn(group=group, bias=bias), ["ConvTranspose"], 1)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha,beta,bias", [(1.0, 1.0, True), (0.5, 2.0, True), (1.0, 1.0, False)])
def test_gemm_bn(trans_b, alpha, beta, bias):
    out = check(build_gemm_bn(trans_b=trans_b, alpha=alpha, beta=beta, bias=bias), ["Flatten", "Gemm"], 1)
    gemm = next(n for n in out.graph.node if n.op_type == "Gemm")
    attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
    assert attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0
    assert attrs.get("transB", 0) == trans_b


def _add_consumer(model: onnx.ModelProto, tensor: str, shape: list, op: str = "Sigmoid") -> onnx.ModelProto:
    """`tensor` also feeds `op` -> graph output 'aux'."""
    model.graph.node.append(helper.make_node(op, [tensor], ["aux"], name="aux"))
    model.graph.output.append(helper.make_tensor_value_info("aux", TensorProto.FLOAT, shape))
    onnx.checker.check_model(model)
    return model


def test_conv_output_with_second_consumer_is_not_folded():
    model = build_conv_bn_relu()
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    _add_consumer(model, conv.output[0], ["N", 8, 8, 8])
    out = check(model, ["Conv", "Mul", "Add", "Relu", "Sigmoid"], 1)
    np.testing.assert_array_equal(conv_weight(out), conv_weight(model))


def test_conv_output_that_is_a_graph_output_is_not_folded():
    model = build_conv_bn_relu()
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    model.graph.output.append(helper.make_tensor_value_info(conv.output[0], TensorProto.FLOAT, ["N", 8, 8, 8]))
    out = check(model, ["Conv", "Mul", "Add", "Relu"], 1)
    np.testing.assert_array_equal(conv_weight(out), conv_weight(model))


def test_bn_producing_graph_output_keeps_its_name():
    model = build_conv_transpose_bn()
    out = check(model, ["ConvTranspose"], 1)
    assert out.graph.node[0].output[0] == "output"


def _standalone_bn(before: list[str]) -> onnx.ModelProto:
    """input (N,4,5,5) -> [ops in `before`] -> BN -> output."""
    rng = np.random.default_rng(3)
    nodes, x = [], "input"
    for i, op in enumerate(before):
        nodes.append(helper.make_node(op, [x], [f"t{i}"], name=f"n{i}"))
        x = f"t{i}"
    params = [rng.uniform(0.5, 1.5, 4), rng.standard_normal(4), rng.standard_normal(4), rng.uniform(0.2, 4, 4)]
    names = ["bn.scale", "bn.bias", "bn.mean", "bn.var"]
    inits = [numpy_helper.from_array(p.astype(np.float32), n) for p, n in zip(params, names)]
    nodes.append(helper.make_node("BatchNormalization", [x] + names, ["output"], name="bn", epsilon=1e-5))
    graph = helper.make_graph(nodes, "bn", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4, 5, 5])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 4, 5, 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_bn_after_graph_input_becomes_mul_add():
    out = check(_standalone_bn([]), ["Mul", "Add"], 1)
    mul = next(n for n in out.graph.node if n.op_type == "Mul")
    assert initializer(out, mul.input[1]).shape == (4, 1, 1)


def test_bn_after_relu_becomes_mul_add():
    check(_standalone_bn(["Relu"]), ["Relu", "Mul", "Add"], 1)


def test_bn_on_rank2_input_becomes_mul_add():
    model = build_gemm_bn()
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    _add_consumer(model, gemm.output[0], ["N", 16], op="Relu")
    out = check(model, ["Flatten", "Gemm", "Mul", "Add", "Relu"], 1)
    mul = next(n for n in out.graph.node if n.op_type == "Mul")
    assert initializer(out, mul.input[1]).shape == (16,)


def test_conv_with_variable_weight_is_not_folded():
    model = build_conv_bn_relu()
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    weight = initializer(model, conv.input[1])
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == conv.input[1]))
    model.graph.input.append(helper.make_tensor_value_info(conv.input[1], TensorProto.FLOAT, list(weight.shape)))
    feeds = random_inputs(model)
    feeds[conv.input[1]] = weight
    out, count, _ = apply_pass(model, fold_batchnorm)
    assert count == 1 and sorted(ops(out)) == ["Add", "Conv", "Mul", "Relu"]
    assert max_rel_err(run_ort(model, feeds), run_ort(out, feeds)) < TOL


def test_shared_conv_weight_is_not_changed_for_the_other_conv():
    """Two Convs share one weight; only the one followed by BN gets the scaled copy."""
    model = build_conv_bn_relu()
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    model.graph.node.append(helper.make_node("Conv", ["input", conv.input[1]], ["aux"], name="aux_conv",
                                             kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
    model.graph.output.append(helper.make_tensor_value_info("aux", TensorProto.FLOAT, ["N", 8, 8, 8]))
    out = check(model, ["Conv", "Relu", "Conv"], 1)
    aux = next(n for n in out.graph.node if n.name == "aux_conv")
    np.testing.assert_array_equal(initializer(out, aux.input[1]), conv_weight(model))


def test_bn_with_variable_statistics_is_kept():
    model = _standalone_bn(["Relu"])
    mean = next(t for t in model.graph.initializer if t.name == "bn.mean")
    model.graph.initializer.remove(mean)
    model.graph.input.append(helper.make_tensor_value_info("bn.mean", TensorProto.FLOAT, [4]))
    out, count, log = apply_pass(model, fold_batchnorm)
    assert count == 0 and "BatchNormalization" in ops(out)
    assert any("not all constants" in line for line in log)


def test_no_bn_no_rewrite():
    from tests.models import build_mlp

    model = build_mlp()
    out, count, _ = apply_pass(model, fold_batchnorm)
    assert count == 0 and ops(out) == ops(model)
