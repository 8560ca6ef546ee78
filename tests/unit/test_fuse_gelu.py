"""fuse_gelu on graphs built in code (erf and tanh forms, every association), on MiniLM, ORT equality before/after."""

import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, version_converter

from tests import models
from trtglm.passes import DEFAULT_PIPELINE, run_passes
from trtglm.passes.fuse_gelu import fuse_gelu

CONSTANTS = {"sqrt2": 1.41421, "inv_sqrt2": 0.70710, "one": 1.0, "half": 0.5, "coeff": 0.044715,
             "k": math.sqrt(2 / math.pi), "three": 3.0}


def _gelu_model(form="erf", scale="div", cube="pow", assoc="half_x", swap=False, opset=20, constants=None,
                extra_consumer=None, extra_output=None):
    """x (N, 4, 8) -> decomposed GELU -> y; `swap` flips the operand order of every Add and Mul.

    assoc: 'half_x' (x*0.5)*(1+e), 'half_a' x*(0.5*(1+e)), 'x_a' (x*(1+e))*0.5.
    extra_consumer / extra_output: an intermediate tensor that also feeds a Relu / is also a graph output.
    """
    values = {**CONSTANTS, **(constants or {})}
    inits = [helper.make_tensor(name, TensorProto.FLOAT, [], [v]) for name, v in values.items()]
    nodes = []

    def node(op, a, b, out):
        nodes.append(helper.make_node(op, [b, a] if swap and op in ("Add", "Mul") else [a, b], [out]))

    if form == "erf":
        if scale == "div":
            node("Div", "x", "sqrt2", "u")
        else:
            node("Mul", "x", "inv_sqrt2", "u")
        nodes.append(helper.make_node("Erf", ["u"], ["e"]))
    else:
        if cube == "pow":
            node("Pow", "x", "three", "x3")
        else:
            node("Mul", "x", "x", "x2")
            node("Mul", "x2", "x", "x3")
        node("Mul", "coeff", "x3", "w")
        node("Add", "x", "w", "s")
        node("Mul", "k", "s", "v")
        nodes.append(helper.make_node("Tanh", ["v"], ["e"]))
    node("Add", "e", "one", "a")
    if assoc == "half_x":
        node("Mul", "x", "half", "h")
        node("Mul", "h", "a", "y")
    elif assoc == "half_a":
        node("Mul", "half", "a", "h")
        node("Mul", "x", "h", "y")
    else:
        node("Mul", "x", "a", "h")
        node("Mul", "h", "half", "y")
    nodes.append(helper.make_node("Relu", ["x"], ["x_relu"]))  # x has another consumer
    outputs = ["y", "x_relu"]
    if extra_consumer:
        nodes.append(helper.make_node("Relu", [extra_consumer], ["leak"]))
        outputs.append("leak")
    if extra_output:
        outputs.append(extra_output)
    for i, n in enumerate(nodes):
        n.name = f"n{i}"
    graph = helper.make_graph(nodes, "gelu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits)
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


def _fuse(model, opset=20):
    return models.apply_pass(model, fuse_gelu, opset)


def _check_equal(before, after):
    feeds = models.random_inputs(before, batch=3)
    feeds["x"] *= 3  # reach the tails of erf/tanh
    assert models.max_rel_err(models.run_ort(before, feeds), models.run_ort(after, feeds)) < 1e-5


def _gelu_attrs(model):
    (gelu,) = [n for n in model.graph.node if n.op_type == "Gelu"]
    return gelu, {a.name: helper.get_attribute_value(a) for a in gelu.attribute}


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("assoc", ["half_x", "half_a", "x_a"])
@pytest.mark.parametrize("scale", ["div", "mul"])
def test_erf_form_fused(scale, assoc, swap):
    model = _gelu_model("erf", scale=scale, assoc=assoc, swap=swap)
    fused, count, log = _fuse(model)
    assert count == 1 and sorted(models.ops(fused)) == ["Gelu", "Relu"]
    gelu, attrs = _gelu_attrs(fused)
    assert attrs["approximate"] == b"none" and list(gelu.input) == ["x"] and list(gelu.output) == ["y"]
    assert log == ["fuse_gelu: 5 nodes (erf form) -> Gelu 'y'"]
    _check_equal(model, fused)


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("assoc", ["half_x", "x_a"])
@pytest.mark.parametrize("cube", ["pow", "mul"])
def test_tanh_form_fused(cube, assoc, swap):
    model = _gelu_model("tanh", cube=cube, assoc=assoc, swap=swap)
    fused, count, _ = _fuse(model)
    assert count == 1 and sorted(models.ops(fused)) == ["Gelu", "Relu"]
    assert _gelu_attrs(fused)[1]["approximate"] == b"tanh"
    _check_equal(model, fused)


def test_below_opset_20_recognised_and_kept():
    model = _gelu_model("erf", opset=17)
    fused, count, log = _fuse(model, opset=17)
    assert count == 1 and sorted(models.ops(fused)) == sorted(models.ops(model))
    assert len(log) == 1 and "recognised" in log[0] and "opset 17" in log[0]


@pytest.mark.parametrize("form,kwargs", [
    ("erf", {"constants": {"sqrt2": 1.4}}),
    ("erf", {"constants": {"half": 0.51}}),
    ("tanh", {"constants": {"coeff": 0.05}}),
    ("tanh", {"constants": {"three": 2.0}}),
    ("erf", {"extra_consumer": "e"}),
    ("erf", {"extra_consumer": "h"}),
    ("tanh", {"extra_consumer": "x3"}),
    ("erf", {"extra_output": "a"}),
])
def test_not_matched(form, kwargs):
    model = _gelu_model(form, **kwargs)
    fused, count, log = _fuse(model)
    assert count == 0 and log == [] and "Gelu" not in models.ops(fused)
    _check_equal(model, fused)


def test_minilm_six_erf_gelus_fused_at_opset_20(minilm):
    original = onnx.load(str(minilm / "minilm.onnx"))
    graph = gs.import_onnx(original)
    run_passes(graph, DEFAULT_PIPELINE)
    prepared = gs.export_onnx(graph)

    _, count, log = _fuse(prepared, opset=17)
    assert count == 6 and all("recognised" in line for line in log)

    fused, count, log = _fuse(version_converter.convert_version(prepared, 20), opset=20)
    assert count == 6 and models.ops(fused).count("Gelu") == 6 and "Erf" not in models.ops(fused)
    feeds = {name: np.load(minilm / "eval" / f"{name}.npy")[:16]
             for name in ("input_ids", "attention_mask", "token_type_ids")}
    assert models.max_rel_err(models.run_ort(original, feeds), models.run_ort(fused, feeds)) < 1e-5
