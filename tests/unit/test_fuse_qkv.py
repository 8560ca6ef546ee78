"""fuse_qkv on graphs built in code (Q/K/V with bias, gate/up without), on MiniLM, ORT equality before/after."""


import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests import models
from trtglm.passes import DEFAULT_PIPELINE, PassContext, run_passes
from trtglm.passes.fuse_qkv import fuse_qkv

K = 16


def _proj_model(sizes=(8, 8, 8), bias=(True, True, True), bias_shapes=None, variable_weight=None, opset=17,
                output_matmul=None, share_weight=False, second_input=None):
    """x (N, 4, K) -> one MatMul(x, W_i) [+ Add(b_i)] per size -> Relu -> out_i.

    bias_shapes: shape of each bias (default (N_i,)); variable_weight: index of a member whose weight is a graph
    input; output_matmul: index of a member whose MatMul output is also a graph output; share_weight: W_0 also
    feeds a MatMul on another input; second_input: index of a member reading input 'z' (N, 4, 8) instead of x.
    """
    rng = np.random.default_rng(0)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, K])]
    inits, nodes, outputs = [], [], []
    for i, n in enumerate(sizes):
        src, k = ("z", 8) if i == second_input else ("x", K)
        if i == variable_weight:
            inputs.append(helper.make_tensor_value_info(f"w{i}", TensorProto.FLOAT, [k, n]))
        else:
            inits.append(numpy_helper.from_array((rng.standard_normal((k, n)) / 4).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [src, f"w{i}"], [f"mm{i}"], name=f"proj{i}"))
        y = f"mm{i}"
        if bias[i]:
            shape = bias_shapes[i] if bias_shapes else (n,)
            inits.append(numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), f"b{i}"))
            nodes.append(helper.make_node("Add", [f"b{i}", y], [f"biased{i}"], name=f"proj{i}_bias"))
            y = f"biased{i}"
        nodes.append(helper.make_node("Relu", [y], [f"out{i}"], name=f"relu{i}"))
        outputs.append(f"out{i}")
        if i == output_matmul:
            outputs.append(f"mm{i}")
    if second_input is not None:
        inputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 4, 8]))
    if share_weight:
        inputs.append(helper.make_tensor_value_info("other", TensorProto.FLOAT, ["N", K]))
        nodes.append(helper.make_node("MatMul", ["other", "w0"], ["shared"], name="shared"))
        outputs.append("shared")
    graph = helper.make_graph(nodes, "proj", inputs,
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits)
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


def _fuse(model, opset=17):
    return models.apply_pass(model, fuse_qkv, opset)


def _check_equal(before, after):
    feeds = models.random_inputs(before, batch=3)
    ref, got = models.run_ort(before, feeds), models.run_ort(after, feeds)
    assert [o.name for o in before.graph.output] == [o.name for o in after.graph.output]
    assert models.max_rel_err(ref, got) < 1e-5


def _split_sizes(model):
    (split,) = [n for n in model.graph.node if n.op_type == "Split"]
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    attrs = {a.name: helper.get_attribute_value(a) for a in split.attribute}
    assert attrs["axis"] == -1
    return list(attrs["split"]) if "split" in attrs else inits[split.input[1]].tolist()


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_qkv_with_bias_fused(opset):
    model = _proj_model(sizes=(8, 8, 4), opset=opset)
    fused, count, log = _fuse(model, opset)
    assert count == 1
    assert sorted(models.ops(fused)) == ["Add", "MatMul", "Relu", "Relu", "Relu", "Split"]
    assert _split_sizes(fused) == [8, 8, 4]
    assert log == ["fuse_qkv: 3 MatMuls on 'x' -> 'proj0_fused_bias_output' (N=8+8+4)"]
    _check_equal(model, fused)


def test_gate_up_without_bias_fused():
    model = _proj_model(sizes=(12, 12), bias=(False, False))
    fused, count, _ = _fuse(model)
    assert count == 1 and sorted(models.ops(fused)) == ["MatMul", "Relu", "Relu", "Split"]
    _check_equal(model, fused)


def test_a_member_without_bias_gets_a_zero_bias():
    """Whisper: q_proj and v_proj have a bias, k_proj has none: still one MatMul."""
    model = _proj_model(sizes=(8, 6, 8), bias=(True, False, True))
    fused, count, log = _fuse(model)
    assert count == 1 and models.ops(fused).count("MatMul") == 1 and _split_sizes(fused) == [8, 6, 8]
    assert "(N=8+6+8)" in log[0]
    _check_equal(model, fused)


def test_keepdims_bias_and_graph_output_and_shared_weight():
    """A (1, 1, N) bias is a last-axis bias; a MatMul output that is a graph output keeps its name (that member
    then has no bias of its own: its Add stays); a weight used elsewhere stays as it was."""
    model = _proj_model(bias_shapes=[(1, 1, 8), (8,), (8,)], output_matmul=2, share_weight=True)
    fused, count, _ = _fuse(model)
    assert count == 1 and _split_sizes(fused) == [8, 8, 8]
    assert "w0" in {t.name for t in fused.graph.initializer}
    _check_equal(model, fused)


@pytest.mark.parametrize("case", ["other_axis_bias", "higher_rank_bias"])
def test_a_bias_that_is_not_per_column_stays_its_own_add(case):
    shapes = {"other_axis_bias": [(4, 8), (8,)], "higher_rank_bias": [(1, 1, 1, 8), (8,)]}[case]
    model = _proj_model(sizes=(8, 8), bias_shapes=shapes)
    fused, count, _ = _fuse(model)
    assert count == 1 and _split_sizes(fused) == [8, 8] and models.ops(fused).count("Add") == 2
    _check_equal(model, fused)


@pytest.mark.parametrize("case", ["single", "variable_weight", "different_input"])
def test_not_fused(case):
    model = {
        "single": lambda: _proj_model(sizes=(8,), bias=(True,)),
        "variable_weight": lambda: _proj_model(sizes=(8, 8), variable_weight=1),
        "different_input": lambda: _proj_model(sizes=(8, 8), second_input=1),
    }[case]()
    fused, count, log = _fuse(model)
    assert count == 0 and log == [] and "Split" not in models.ops(fused)
    _check_equal(model, fused)


def test_minilm_six_qkv_groups(minilm):
    original = onnx.load(str(minilm / "minilm.onnx"))
    graph = gs.import_onnx(original)
    run_passes(graph, [p for p in DEFAULT_PIPELINE if p is not fuse_qkv])
    ctx = PassContext(opset=17)
    assert fuse_qkv(graph, ctx) == 6
    assert all(line.endswith("(N=384+384+384)") for line in ctx.log)
    fused = gs.export_onnx(graph)
    onnx.checker.check_model(fused, full_check=True)
    assert models.ops(fused).count("MatMul") == 36 and models.ops(fused).count("Split") == 6
    feeds = {name: np.load(minilm / "eval" / f"{name}.npy")[:16]
             for name in ("input_ids", "attention_mask", "token_type_ids")}
    assert models.max_rel_err(models.run_ort(original, feeds), models.run_ort(fused, feeds)) < 1e-5
