"""remove_identity: Identity / inference Dropout bypassed, dead nodes removed, graph output names preserved."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.models import apply_pass, build_identity_dropout, build_mlp, max_rel_err, ops, random_inputs, run_ort
from trtglm.passes import remove_identity


def _model(nodes, outputs, inits=(), inputs=(("input", ["N", 4]),)) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 4]) for n in outputs], list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def check(model: onnx.ModelProto, expected_ops: list[str], expected_count: int) -> onnx.ModelProto:
    feeds = random_inputs(model)
    out, count, _ = apply_pass(model, remove_identity)
    assert count == expected_count
    assert sorted(ops(out)) == sorted(expected_ops)
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    assert max_rel_err(run_ort(model, feeds), run_ort(out, feeds)) == 0.0
    return out


def test_identity_dropout_model():
    out = check(build_identity_dropout(), ["MatMul", "Relu"], 3)
    relu = next(n for n in out.graph.node if n.op_type == "Relu")
    assert list(relu.output) == ["output"]  # the producer now writes the graph output directly
    matmul = next(n for n in out.graph.node if n.op_type == "MatMul")
    assert matmul.input[1] in {t.name for t in out.graph.initializer}


def test_identity_to_graph_output_with_other_consumers():
    """Relu feeds Identity -> 'output' and Sigmoid -> 'output2': Sigmoid then reads 'output'."""
    model = _model([helper.make_node("Relu", ["input"], ["r"], name="relu"),
                    helper.make_node("Identity", ["r"], ["output"], name="id"),
                    helper.make_node("Sigmoid", ["r"], ["output2"], name="sig")], ["output", "output2"])
    out = check(model, ["Relu", "Sigmoid"], 1)
    sig = next(n for n in out.graph.node if n.op_type == "Sigmoid")
    assert list(sig.input) == ["output"]


def test_identity_from_graph_input_to_graph_output_is_kept():
    model = _model([helper.make_node("Identity", ["input"], ["output"], name="id")], ["output"])
    check(model, ["Identity"], 0)


def test_identity_between_two_graph_outputs_is_kept():
    model = _model([helper.make_node("Relu", ["input"], ["output"], name="relu"),
                    helper.make_node("Identity", ["output"], ["output2"], name="id")], ["output", "output2"])
    check(model, ["Relu", "Identity"], 0)


def test_identity_of_initializer_to_graph_output_is_kept():
    init = numpy_helper.from_array(np.ones((2, 4), np.float32), "w")
    model = _model([helper.make_node("Identity", ["w"], ["output"], name="id"),
                    helper.make_node("Relu", ["input"], ["output2"], name="relu")], ["output", "output2"], [init])
    check(model, ["Identity", "Relu"], 0)


def test_chain_of_identities_into_graph_output():
    model = _model([helper.make_node("Relu", ["input"], ["r"], name="relu"),
                    helper.make_node("Identity", ["r"], ["a"], name="id1"),
                    helper.make_node("Identity", ["a"], ["output"], name="id2")], ["output"])
    out = check(model, ["Relu"], 2)
    assert list(out.graph.node[0].output) == ["output"]


def _dropout_model(mask_output: bool = False, training_mode=None) -> onnx.ModelProto:
    inputs, inits = ["input", "ratio"], [numpy_helper.from_array(np.array(0.5, np.float32), "ratio")]
    if training_mode is not None:
        inputs.append("mode")
        inits.append(numpy_helper.from_array(np.array(training_mode), "mode"))
    outs = ["d", "mask"] if mask_output else ["d"]
    nodes = [helper.make_node("Dropout", inputs, outs, name="dropout"),
             helper.make_node("Relu", ["d"], ["output"], name="relu")]
    model = _model(nodes, ["output"], inits)
    if mask_output:
        model.graph.output.append(helper.make_tensor_value_info("mask", TensorProto.BOOL, ["N", 4]))
    return model


def test_dropout_removed():
    check(_dropout_model(), ["Relu"], 1)


def test_dropout_with_training_mode_false_removed():
    check(_dropout_model(training_mode=False), ["Relu"], 1)


def test_dropout_with_training_mode_true_kept():
    out, count, _ = apply_pass(_dropout_model(training_mode=True), remove_identity)
    assert count == 0 and "Dropout" in ops(out)


def test_dropout_with_used_mask_kept():
    out, count, _ = apply_pass(_dropout_model(mask_output=True), remove_identity)
    assert count == 0 and "Dropout" in ops(out)


def test_dropout_with_unused_mask_removed():
    model = _dropout_model()
    model.graph.node[0].output.append("unused_mask")
    check(model, ["Relu"], 1)


def test_dead_nodes_removed_and_counted():
    model = _model([helper.make_node("Relu", ["input"], ["output"], name="relu"),
                    helper.make_node("Sigmoid", ["input"], ["dead1"], name="dead1"),
                    helper.make_node("Tanh", ["dead1"], ["dead2"], name="dead2")], ["output"])
    check(model, ["Relu"], 2)


@pytest.mark.parametrize("builder", [build_mlp])
def test_nothing_to_remove(builder):
    model = builder()
    out = check(model, ops(model), 0)
    assert ops(out) == ops(model)


def test_same_type_cast_is_bypassed_and_a_converting_cast_is_kept():
    nodes = [helper.make_node("Cast", ["input"], ["same"], name="same", to=TensorProto.FLOAT),
             helper.make_node("Relu", ["same"], ["r"], name="relu"),
             helper.make_node("Cast", ["r"], ["half"], name="to_half", to=TensorProto.FLOAT16),
             helper.make_node("Cast", ["half"], ["output"], name="back", to=TensorProto.FLOAT)]
    model = onnx.shape_inference.infer_shapes(_model(nodes, ["output"]))
    check(model, ["Relu", "Cast", "Cast"], 1)
