"""fuse_layernorm on graphs built in code: matched and not-matched cases, ORT equality before/after."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper

from tests import models
from trtglm.passes import PassContext
from trtglm.passes.fuse_layernorm import fuse_layernorm

H = 16


def _norm_model(kind="layernorm", opset=17, square="Pow", recip=False, extra_consumer=False, axis=-1, eps=1e-5):
    """x (N, 4, H) -> decomposed LayerNorm or RMSNorm with gamma (and beta) -> y."""
    rng = np.random.default_rng(0)
    inits = [helper.make_tensor("gamma", TensorProto.FLOAT, [H], rng.uniform(0.5, 2, H).astype(np.float32)),
             helper.make_tensor("beta", TensorProto.FLOAT, [H], rng.standard_normal(H).astype(np.float32)),
             helper.make_tensor("eps", TensorProto.FLOAT, [], [eps]),
             helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])]
    nodes = []

    def reduce(x, out):
        if opset >= 18:
            nodes.append(helper.make_node("ReduceMean", [x, "axes"], [out], keepdims=1))
        else:
            nodes.append(helper.make_node("ReduceMean", [x], [out], axes=[axis], keepdims=1))

    if opset >= 18:
        inits.append(helper.make_tensor("axes", TensorProto.INT64, [1], [axis]))
    base = "x"
    if kind == "layernorm":
        reduce("x", "mean")
        nodes.append(helper.make_node("Sub", ["x", "mean"], ["d"]))
        base = "d"
    if square == "Pow":
        nodes.append(helper.make_node("Pow", [base, "two"], ["sq"]))
    else:
        nodes.append(helper.make_node("Mul", [base, base], ["sq"]))
    reduce("sq", "var")
    nodes += [helper.make_node("Add", ["var", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["std"])]
    if recip == "div":  # torch.rsqrt as TorchScript exports it: Div(1, Sqrt)
        inits.append(helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]))
        nodes += [helper.make_node("Div", ["one", "std"], ["inv"]), helper.make_node("Mul", ["inv", base], ["n"])]
    elif recip:
        nodes += [helper.make_node("Reciprocal", ["std"], ["inv"]), helper.make_node("Mul", [base, "inv"], ["n"])]
    else:
        nodes.append(helper.make_node("Div", [base, "std"], ["n"]))
    nodes.append(helper.make_node("Mul", ["n", "gamma"], ["g"]))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, H])]
    if kind == "layernorm":
        nodes.append(helper.make_node("Add", ["g", "beta"], ["y"]))
    else:
        nodes.append(helper.make_node("Identity", ["g"], ["y"]))
    if extra_consumer:
        nodes.append(helper.make_node("Relu", ["var"], ["leak"]))
        outputs.append(helper.make_tensor_value_info("leak", TensorProto.FLOAT, None))
    for i, n in enumerate(nodes):
        n.name = f"n{i}"
    graph = helper.make_graph(nodes, "norm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, H])],
                              outputs, inits)
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


def _fuse(model, opset):
    graph = gs.import_onnx(model)
    count = fuse_layernorm(graph, PassContext(opset=opset))
    out = gs.export_onnx(graph)
    onnx.checker.check_model(out)
    return out, count


def _check_equal(before, after):
    feeds = models.random_inputs(before, batch=3)
    ref, got = models.run_ort(before, feeds), models.run_ort(after, feeds)
    assert models.max_rel_err(ref, got) < 1e-5


@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize("square,recip", [("Pow", False), ("Mul", False), ("Pow", True), ("Pow", "div")])
def test_layernorm_fused_into_one_node(opset, square, recip):
    model = _norm_model(opset=opset, square=square, recip=recip)
    fused, count = _fuse(model, opset)
    assert count == 1
    assert models.ops(fused) == ["LayerNormalization"]
    attrs = {a.name: helper.get_attribute_value(a) for a in fused.graph.node[0].attribute}
    assert attrs["axis"] == -1 and attrs["epsilon"] == pytest.approx(1e-5)
    _check_equal(model, fused)


def test_low_opset_leaves_the_graph_and_says_why():
    model = _norm_model(opset=17)
    graph = gs.import_onnx(model)
    ctx = PassContext(opset=16)
    assert fuse_layernorm(graph, ctx) == 0
    assert any("opset 16" in line for line in ctx.log)


@pytest.mark.parametrize("case", ["extra_consumer", "axis"])
def test_not_matched(case):
    model = _norm_model(extra_consumer=True) if case == "extra_consumer" else _norm_model(axis=1)
    fused, count = _fuse(model, 17)
    assert count == 0 and "LayerNormalization" not in models.ops(fused)
    _check_equal(model, fused)


def test_rmsnorm_only_from_opset_23():
    model = _norm_model(kind="rmsnorm", opset=17)
    fused, count = _fuse(model, 17)
    assert count == 0 and "RMSNormalization" not in models.ops(fused)
    graph, ctx = gs.import_onnx(model), PassContext(opset=17)
    fuse_layernorm(graph, ctx)
    assert ctx.recognised["rmsnorm"] == 1  # kept decomposed, still counted by the fusion summary


@pytest.mark.parametrize("recip", [False, "div"])
def test_rmsnorm_fused_at_opset_23(recip):
    model = _norm_model(kind="rmsnorm", opset=23, recip=recip)
    fused, count = _fuse(model, 23)
    assert count == 1 and "RMSNormalization" in models.ops(fused)
    _check_equal(model, fused)
