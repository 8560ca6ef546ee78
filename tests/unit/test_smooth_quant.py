"""SmoothQuant: the smoothed FP32 graph computes the same function, outlier channels move into the weights."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from tests import models
from trtglm.calib.collect import collect
from trtglm.passes.smooth_quant import smooth_quant


def _model():
    """x (N, 4, 8) with an outlier channel -> LayerNormalization -> two MatMuls sharing it, plus a residual Add."""
    rng = np.random.default_rng(0)
    gamma = np.ones(8, np.float32)
    gamma[3] = 40.0  # LayerNorm output channel 3 is an outlier, as in BERT
    inits = [helper.make_tensor("gamma", TensorProto.FLOAT, [8], gamma),
             helper.make_tensor("beta", TensorProto.FLOAT, [8], np.zeros(8, np.float32)),
             helper.make_tensor("w1", TensorProto.FLOAT, [8, 6], rng.standard_normal(48).astype(np.float32)),
             helper.make_tensor("w2", TensorProto.FLOAT, [8, 8], rng.standard_normal(64).astype(np.float32))]
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], name="ln", axis=-1),
             helper.make_node("MatMul", ["ln", "w1"], ["a"], name="mm1"),
             helper.make_node("MatMul", ["ln", "w2"], ["b"], name="mm2"),
             helper.make_node("Add", ["ln", "b"], ["res"], name="residual")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8])],
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 4, 6]),
                               helper.make_tensor_value_info("res", TensorProto.FLOAT, ["N", 4, 8])], inits)
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_smoothing_keeps_the_function_and_flattens_the_outlier_channel():
    model = _model()
    feeds = models.random_inputs(model, batch=8)
    stats = collect(model, ["ln"], [feeds])
    assert stats["ln"].channel_absmax.argmax() == 3
    graph = gs.import_onnx(model)
    assert smooth_quant(graph, stats, alpha=0.8) == 1
    smoothed = gs.export_onnx(graph)
    onnx.checker.check_model(smoothed)
    assert models.max_rel_err(models.run_ort(model, feeds), models.run_ort(smoothed, feeds)) < 1e-5
    nodes = {n.name: n for n in graph.nodes}
    assert nodes["mm1"].inputs[0].name == nodes["mm2"].inputs[0].name == "ln_smoothed"
    assert nodes["residual"].inputs[0].name == "ln"  # the residual path reads the unsmoothed tensor
    after = collect(smoothed, ["ln_smoothed"], [feeds])["ln_smoothed"].channel_absmax
    before = stats["ln"].channel_absmax
    assert after.max() / after.min() < before.max() / before.min() / 5


def test_nodes_kept_float_are_not_smoothed():
    model = _model()
    feeds = models.random_inputs(model, batch=4)
    stats = collect(model, ["ln"], [feeds])
    graph = gs.import_onnx(model)
    assert smooth_quant(graph, stats, alpha=0.5, keep_float=frozenset({"mm1", "mm2"})) == 0
    assert models.ops(gs.export_onnx(graph)) == models.ops(model)


def test_pre_norm_smoothing_folds_into_the_normalization_without_a_node():
    """RMSNormalization -> QKV-like MatMuls only (a pre-norm decoder): 1/s goes into the norm's scale."""
    rng = np.random.default_rng(1)
    gamma = np.ones(8, np.float32)
    gamma[5] = 30.0
    inits = [helper.make_tensor("gamma", TensorProto.FLOAT, [8], gamma),
             helper.make_tensor("w1", TensorProto.FLOAT, [8, 6], rng.standard_normal(48).astype(np.float32)),
             helper.make_tensor("w2", TensorProto.FLOAT, [8, 4], rng.standard_normal(32).astype(np.float32))]
    nodes = [helper.make_node("RMSNormalization", ["x", "gamma"], ["n"], name="norm", axis=-1),
             helper.make_node("MatMul", ["n", "w1"], ["a"], name="mm1"),
             helper.make_node("MatMul", ["n", "w2"], ["b"], name="mm2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8])],
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 4, 6]),
                               helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 4, 4])], inits)
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]))
    feeds = models.random_inputs(model, batch=8)
    stats = collect(model, ["n"], [feeds])
    g = gs.import_onnx(model)
    assert smooth_quant(g, stats, alpha=0.8) == 1
    smoothed = gs.export_onnx(g)
    onnx.checker.check_model(smoothed)
    assert [n.op_type for n in smoothed.graph.node] == ["RMSNormalization", "MatMul", "MatMul"]
    assert {n.input[0] for n in smoothed.graph.node if n.op_type == "MatMul"} == {"n_smoothed"}
    assert models.max_rel_err(models.run_ort(model, feeds), models.run_ort(smoothed, feeds)) < 1e-5
    flat = collect(smoothed, ["n_smoothed"], [feeds])["n_smoothed"].channel_absmax
    assert flat.max() / np.median(flat) < stats["n"].channel_absmax.max() / np.median(stats["n"].channel_absmax)
