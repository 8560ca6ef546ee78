"""weight_only on graphs built in code: blocked DequantizeLinear-21 on MatMul/Gemm weights, run by ONNX Runtime.

Tolerance: every quantized weight is within half a scale step of the FP32 weight (round to nearest; symmetric
blocks never clip, asymmetric blocks clip by at most half a step), so each output element obeys the hard bound
|y - y_fp32| <= 0.5 * |x| @ scale (scale repeated over its block). For a gaussian block of 128 the absmax is about
2.7 sigma, so the relative RMS error is about 2.7 / (qmax * sqrt(12)): ~0.11 for INT4 (the "1/16 of the block
absmax" step, halved) and ~0.006 for INT8.
"""

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests import models
from trtglm.errors import ConfigError, ModelError
from trtglm.passes.weight_only import model_from_graph, quantize_blocks, weight_only

K, N = 256, 64


def _weight(k=K, n=N, shift=0.0, seed=0):
    return (np.random.default_rng(seed).standard_normal((k, n)) + shift).astype(np.float32)


def _matmul_model(w, opset=21, op="MatMul", trans_b=0, shared=False):
    """x (B, K) -> MatMul/Gemm with constant weight w -> y (and a second MatMul on the same weight if shared)."""
    k = w.shape[1] if trans_b else w.shape[0]
    n = w.shape[0] if trans_b else w.shape[1]
    attrs = {"transB": trans_b} if op == "Gemm" else {}
    nodes = [helper.make_node(op, ["x", "w"], ["y"], name="proj", **attrs)]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", n])]
    if shared:
        nodes.append(helper.make_node(op, ["x", "w"], ["y2"], name="proj2", **attrs))
        outputs.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["B", n]))
    graph = helper.make_graph(nodes, "wo", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", k])],
                              outputs, [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _quantize(model, bits, block, asymmetric=False, keep_float=frozenset()):
    graph = gs.import_onnx(model)
    log: list[str] = []
    count = weight_only(graph, bits, block, asymmetric, keep_float, log=log)
    out = model_from_graph(graph)
    onnx.checker.check_model(out)
    return out, count, log


def _inits(model):
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _dq(model):
    (node,) = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    return node, {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _dequantized(model, axis):
    """(q - zero_point) * scale from the exported initializers, in numpy."""
    node, attrs = _dq(model)
    inits = _inits(model)
    q = inits[node.input[0]].astype(np.float64)
    scale = np.repeat(inits[node.input[1]].astype(np.float64), attrs["block_size"], axis=axis)
    zero = np.repeat(inits[node.input[2]].astype(np.float64), attrs["block_size"], axis=axis) \
        if len(node.input) > 2 else 0.0
    return (q - zero) * scale, scale


def _x(k=K, rows=5):
    return np.random.default_rng(1).standard_normal((rows, k)).astype(np.float32)


@pytest.mark.parametrize("bits,block,asymmetric,rms_tol", [
    (8, 128, False, 0.01), (8, 32, False, 0.01), (4, 128, False, 0.15), (4, 32, False, 0.15),
    (8, 128, True, 0.01), (4, 128, True, 0.15)])
def test_matmul_close_to_fp32(bits, block, asymmetric, rms_tol):
    w = _weight()
    model = _matmul_model(w)
    out, count, _ = _quantize(model, bits, block, asymmetric)
    assert count == 1
    node, attrs = _dq(out)
    assert attrs == {"axis": 0, "block_size": block}
    inits = _inits(out)
    assert inits[node.input[1]].shape == (K // block, N) and inits[node.input[1]].dtype == np.float32
    assert [n.op_type for n in out.graph.node] == ["DequantizeLinear", "MatMul"]
    x = _x()
    (ref,), (got,) = models.run_ort(model, {"x": x}), models.run_ort(out, {"x": x})
    _, scale = _dequantized(out, axis=0)
    bound = 0.5 * np.abs(x).astype(np.float64) @ scale
    assert np.all(np.abs(got - ref) <= bound * (1 + 1e-5) + 1e-5)
    rms = np.sqrt(np.mean((got - ref) ** 2) / np.mean(ref**2))
    assert rms < rms_tol
    assert rms > rms_tol / 100  # really quantized, not a float copy


@pytest.mark.parametrize("bits,asymmetric,qtype", [
    (8, False, np.int8), (4, False, ml_dtypes.int4), (8, True, np.uint8), (4, True, ml_dtypes.uint4)])
def test_exact_round_trip(bits, asymmetric, qtype):
    """ORT's dequantized weight (x = identity makes y the weight itself) equals (q - zero_point) * scale exactly."""
    out, _, _ = _quantize(_matmul_model(_weight()), bits, 32, asymmetric)
    node, _ = _dq(out)
    q = _inits(out)[node.input[0]]
    assert q.dtype == np.dtype(qtype)
    (got,) = models.run_ort(out, {"x": np.eye(K, dtype=np.float32)})
    expected, _ = _dequantized(out, axis=0)
    np.testing.assert_array_equal(got, expected.astype(np.float32))
    if not asymmetric:  # each block's absmax lands on +-qmax
        qmax = 2 ** (bits - 1) - 1
        blocks = np.abs(q.astype(np.int32)).reshape(K // 32, 32, N).max(axis=1)
        assert np.all(blocks == qmax)


def test_int4_packed_size():
    w = _weight(512, 256)
    model = _matmul_model(w)
    out, _, _ = _quantize(model, 4, 128)
    node, _ = _dq(out)
    (packed,) = [i for i in out.graph.initializer if i.name == node.input[0]]
    assert packed.data_type == TensorProto.INT4 and len(packed.raw_data) == w.size // 2
    fp32, int4 = len(model.SerializeToString()), len(out.SerializeToString())
    scales = w.size // 128 * 4
    assert int4 <= fp32 / 8 + scales + 1024
    again = model_from_graph(gs.import_onnx(out))  # re-import keeps int4 values; builds are byte-identical
    assert again.SerializeToString() == out.SerializeToString() == _quantize(model, 4, 128)[0].SerializeToString()
    onnx.checker.check_model(onnx.shape_inference.infer_shapes(again), full_check=True)


def test_asymmetric_zero_points():
    """A weight that is all positive: its zero point is 0 in every block, and asymmetric beats symmetric."""
    w = np.abs(_weight()) + 0.5
    model = _matmul_model(w)
    out, _, _ = _quantize(model, 4, 64, asymmetric=True)
    node, _ = _dq(out)
    zero = _inits(out)[node.input[2]]
    assert zero.dtype == np.dtype(ml_dtypes.uint4) and zero.shape == (K // 64, N)
    assert np.all(zero.astype(np.int32) == 0)
    sym, _, _ = _quantize(model, 4, 64)
    err = {name: np.abs(_dequantized(m, 0)[0] - w).mean() for name, m in (("asym", out), ("sym", sym))}
    assert err["asym"] < 0.6 * err["sym"]
    shifted = _weight(shift=-1.0)  # mixed signs, mostly negative: zero points strictly inside (0, 15)
    _, _, zp = quantize_blocks(shifted, 0, 4, 64, asymmetric=True)
    zp = zp.astype(np.int32)
    assert np.all((zp > 0) & (zp < 15))


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_blocks_along_k(trans_b):
    w = _weight()
    model = _matmul_model(w.T.copy() if trans_b else w, op="Gemm", trans_b=trans_b)
    out, count, _ = _quantize(model, 4, 64)
    assert count == 1
    node, attrs = _dq(out)
    assert attrs["axis"] == trans_b
    assert _inits(out)[node.input[1]].shape == ((N, K // 64) if trans_b else (K // 64, N))
    x = _x()
    (ref,), (got,) = models.run_ort(model, {"x": x}), models.run_ort(out, {"x": x})
    assert np.sqrt(np.mean((got - ref) ** 2) / np.mean(ref**2)) < 0.15


def test_k_not_multiple_of_block_kept_float():
    model = _matmul_model(_weight(k=200))
    out, count, log = _quantize(model, 4, 128)
    assert count == 0
    assert [n.op_type for n in out.graph.node] == ["MatMul"]
    assert any("'proj' kept float" in line and "K=200" in line for line in log)


def test_untouched_dynamic_weight_and_keep_float():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="dynamic")]
    graph = helper.make_graph(nodes, "dyn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, K]),
                                             helper.make_tensor_value_info("w", TensorProto.FLOAT, [K, N])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, N])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    out, count, _ = _quantize(model, 8, 128)
    assert count == 0 and [n.op_type for n in out.graph.node] == ["MatMul"]
    out, count, _ = _quantize(_matmul_model(_weight()), 8, 128, keep_float=frozenset({"proj"}))
    assert count == 0 and [n.op_type for n in out.graph.node] == ["MatMul"]


def test_shared_weight_quantized_once():
    out, count, _ = _quantize(_matmul_model(_weight(), shared=True), 4, 128)
    assert count == 1
    assert [n.op_type for n in out.graph.node].count("DequantizeLinear") == 1


def test_rejects_old_opset_and_bad_options():
    with pytest.raises(ModelError, match="opset 17.*needs opset 21"):
        weight_only(gs.import_onnx(_matmul_model(_weight(), opset=17)), 4, 128)
    with pytest.raises(ConfigError, match="3 bits"):
        weight_only(gs.import_onnx(_matmul_model(_weight())), 3, 128)
    with pytest.raises(ConfigError, match="block-size 0"):
        weight_only(gs.import_onnx(_matmul_model(_weight())), 4, 0)


def test_float16_weight_gets_float16_scales():
    w = _weight().astype(np.float16)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")]
    graph = helper.make_graph(nodes, "fp16", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["B", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["B", N])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    out, count, _ = _quantize(model, 4, 128)
    node, _ = _dq(out)
    assert count == 1 and _inits(out)[node.input[1]].dtype == np.float16
    x = _x().astype(np.float16)
    (ref,), (got,) = models.run_ort(model, {"x": x}), models.run_ort(out, {"x": x})
    assert got.dtype == np.float16
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    assert np.sqrt(np.mean((got - ref) ** 2) / np.mean(ref**2)) < 0.15
