"""Collector: statistics of intermediate tensors of a tiny ONNX model equal numpy's, errors name the tensor."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from trtglm.calib.collect import collect
from trtglm.calib.stats import TensorStats
from trtglm.errors import CalibrationError, DataError

RNG = np.random.default_rng(0)
WEIGHT = RNG.normal(size=(8, 4)).astype(np.float32)


def _model() -> onnx.ModelProto:
    """x (N, 8) -> MatMul(W) -> mm_out -> Relu -> y; plus a Shape -> shape_out (int64)."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["mm_out"], name="mm"),
         helper.make_node("Relu", ["mm_out"], ["y"], name="relu"),
         helper.make_node("Shape", ["mm_out"], ["shape_out"], name="shape")],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("shape_out", TensorProto.INT64, [2])],
        [numpy_helper.from_array(WEIGHT, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _batches(n=4):
    return [{"x": RNG.normal(size=(int(RNG.integers(1, 6)), 8)).astype(np.float32)} for _ in range(n)]


def test_stats_match_numpy():
    model = _model()
    batches = _batches()
    stats = collect(model, ["y", "mm_out", "x", "mm_out"], iter(batches), total=len(batches))
    assert sorted(stats) == ["mm_out", "x", "y"]
    x = np.concatenate([b["x"] for b in batches])
    mm = x @ WEIGHT
    expected = {"x": x, "mm_out": mm, "y": np.maximum(mm, 0)}
    for name, values in expected.items():
        assert stats[name].count == values.size
        assert stats[name].absmax == pytest.approx(float(np.abs(values).max()), rel=1e-6)
        assert stats[name].batches == len(batches)
    # x is fed unchanged, so its histogram is exactly numpy's
    direct = TensorStats("x")
    direct.update(x)
    np.testing.assert_array_equal(stats["x"].hist, direct.hist)
    assert len(model.graph.output) == 2  # the caller's model is not modified


def test_nan_input_names_the_tensor():
    batches = _batches(3)
    batches[2]["x"][0, 0] = np.nan
    with pytest.raises(CalibrationError, match=r"tensor 'mm_out' has NaN values in batch 2"):
        collect(_model(), ["mm_out"], batches)


def test_non_float_and_unknown_tensors_are_errors():
    with pytest.raises(CalibrationError, match="shape_out"):
        collect(_model(), ["shape_out"], _batches(1))
    with pytest.raises(CalibrationError, match="'nope' is not produced"):
        collect(_model(), ["nope"], _batches(1))
    with pytest.raises(CalibrationError, match="'W' is a constant"):
        collect(_model(), ["W"], _batches(1))


def test_missing_input_is_a_data_error():
    with pytest.raises(DataError, match=r"batch 0: missing input\(s\) 'x'"):
        collect(_model(), ["y"], [{"pixels": np.zeros((1, 8), np.float32)}])


def test_large_model_path_uses_external_data(monkeypatch):
    """Models over protobuf's 2 GiB limit go through a temporary file with external data (limit lowered here)."""
    monkeypatch.setattr("trtglm.calib.collect.PROTO_LIMIT", 100)
    monkeypatch.setattr("trtglm.runtime.PROTO_LIMIT", 100)
    batches = _batches(2)
    stats = collect(_model(), ["y"], batches)
    expected = np.maximum(np.concatenate([b["x"] for b in batches]) @ WEIGHT, 0)
    assert stats["y"].absmax == pytest.approx(float(expected.max()), rel=1e-6)
