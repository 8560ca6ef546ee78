"""The build command end to end on small models: artefacts, determinism, and every kind of bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from tests import models
from trtglm.cli import main


@pytest.fixture()
def cnn(tmp_path):
    """A CNN classifier file with .npy calibration data (64 samples) and labels."""
    model = models.build_cnn_classifier()
    path = tmp_path / "cnn.onnx"
    onnx.save(model, path)
    rng = np.random.default_rng(0)
    calib = tmp_path / "calib"
    calib.mkdir()
    np.save(calib / "input.npy", rng.standard_normal((64, 3, 8, 8)).astype(np.float32))
    return path, calib


def _build(*args):
    result = CliRunner().invoke(main, ["build", *map(str, args)])
    return result


def _assert_one_line_error(result, *needles):
    assert result.exit_code not in (0, None), result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    err = errors[0]
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in err, (needle, err)


def _no_files(out: Path):
    assert not out.exists() or not any(out.rglob("*")), sorted(out.rglob("*"))


def test_build_writes_every_artefact(cnn, tmp_path):
    model, calib = cnn
    out = tmp_path / "out"
    result = _build(model, "--int8", "--calib", calib, "--out", out)
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out.iterdir())
    assert names == ["calib.cache", "model.fp32.opt.onnx", "model.int8.qdq.onnx", "plots", "quant_config.json",
                     "report.json", "report.md"]
    rep = json.loads((out / "report.json").read_text())
    assert rep["engine"]["built"] is False and "tensorrt" in rep["engine"]["reason"].lower()
    assert rep["engine"]["trtexec"].startswith("trtexec --onnx=") and "--minShapes=input:1x3x8x8" in \
        rep["engine"]["trtexec"]  # one profile from the data: batch 1 to --batch-size
    assert rep["engine"]["polygraphy"].startswith("polygraphy run")
    acc = rep["accuracy"]
    assert acc["samples"] == 13  # the held-out 20% of 64
    logits = acc["outputs"]["logits"]
    assert logits["sim"]["top1_agreement"] >= 75.0 and logits["sim"]["cosine"] > 0.99
    assert acc["fp32_optimized_max_rel_err"] < 1e-4
    assert rep["tensors"] and all(t["amax"] > 0 for t in rep["tensors"].values())
    assert list((out / "plots").glob("*.png"))
    qdq = onnx.load(out / "model.int8.qdq.onnx")
    assert not any(n.op_type == "BatchNormalization" for n in qdq.graph.node)
    assert sum(n.op_type == "QuantizeLinear" for n in qdq.graph.node) >= 3
    assert "calibrated" not in result.stderr  # the console reports, it does not leak internals
    assert "TensorRT engine: not built" in result.stderr


def test_two_builds_are_byte_identical(cnn, tmp_path):
    model, calib = cnn
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        assert _build(model, "--calib", calib, "--out", out).exit_code == 0
    for name in ("model.int8.qdq.onnx", "model.fp32.opt.onnx", "calib.cache"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


def test_calibration_cache_replaces_data_and_round_trips(cnn, tmp_path):
    model, calib = cnn
    first = tmp_path / "first"
    assert _build(model, "--calib", calib, "--out", first).exit_code == 0
    second = tmp_path / "second.onnx"
    result = _build(model, "--calib-cache", first / "calib.cache", "-o", second)
    assert result.exit_code == 0, result.output
    assert second.read_bytes() == (first / "model.int8.qdq.onnx").read_bytes()
    assert (tmp_path / "second.calib.cache").read_text() == (first / "calib.cache").read_text()


def test_check_tol_fails_the_build_but_keeps_the_artefacts(cnn, tmp_path):
    model, calib = cnn
    out = tmp_path / "out"
    result = _build(model, "--calib", calib, "--out", out, "--check-tol", "-1")
    _assert_one_line_error(result, "logits", "--check-tol")
    assert (out / "model.int8.qdq.onnx").exists()


def test_missing_model(tmp_path):
    result = _build(tmp_path / "nope.onnx", "--calib", tmp_path, "--out", tmp_path / "out")
    _assert_one_line_error(result, "nope.onnx", "not found")
    _no_files(tmp_path / "out")


def test_non_onnx_model(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_text("this is not a protobuf at all, just text\n" * 10)
    result = _build(path, "--calib", tmp_path, "--out", tmp_path / "out")
    _assert_one_line_error(result, "model.onnx")
    _no_files(tmp_path / "out")


def test_truncated_model(cnn, tmp_path):
    model, calib = cnn
    data = model.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    result = _build(cut, "--calib", calib, "--out", tmp_path / "out")
    _assert_one_line_error(result, "cut.onnx")
    _no_files(tmp_path / "out")


def test_empty_calibration_directory(cnn, tmp_path):
    model, _ = cnn
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _build(model, "--calib", empty, "--out", tmp_path / "out")
    _assert_one_line_error(result, "empty")
    _no_files(tmp_path / "out")


@pytest.mark.parametrize("case", ["shape", "dtype", "name", "nan", "inf"])
def test_bad_calibration_sample(cnn, tmp_path, case):
    model, _ = cnn
    bad = tmp_path / "bad"
    bad.mkdir()
    x = np.random.default_rng(1).standard_normal((8, 3, 8, 8)).astype(np.float32)
    name = "input"
    if case == "shape":
        x = x[:, :, :4]
    elif case == "dtype":
        x = (x * 10).astype(np.int32)
    elif case == "name":
        name = "pixels"
    elif case == "nan":
        x[5, 0, 1, 1] = np.nan
    else:
        x[2, 1, 0, 0] = np.inf
    np.save(bad / f"{name}.npy", x)
    result = _build(model, "--calib", bad, "--out", tmp_path / "out")
    _assert_one_line_error(result, f"{name}.npy", "pixels" if case == "name" else "input")
    _no_files(tmp_path / "out")


def test_unwritable_out(cnn, tmp_path):
    model, calib = cnn
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = _build(model, "--calib", calib, "--out", blocker / "out")
    _assert_one_line_error(result, str(blocker / "out"))
    assert blocker.read_text() == "x"


def test_console_script_exit_code_and_no_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.run([sys.executable, "-m", "trtglm.cli", "build", str(tmp_path / "missing.onnx"), "--calib",
                           str(tmp_path)], capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "missing.onnx" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_already_quantized_model_is_refused(cnn, tmp_path):
    model, calib = cnn
    out = tmp_path / "out"
    assert _build(model, "--calib", calib, "--out", out).exit_code == 0
    result = _build(out / "model.int8.qdq.onnx", "--calib", calib, "--out", tmp_path / "again")
    _assert_one_line_error(result, "model.int8.qdq.onnx", "already quantized")
    _no_files(tmp_path / "again")


def test_smoothquant_build_and_bad_alpha(cnn, tmp_path):
    model, calib = cnn
    result = _build(model, "--calib", calib, "--smoothquant", "0.8", "--out", tmp_path / "sq")
    assert result.exit_code == 0, result.output
    rep = json.loads((tmp_path / "sq" / "report.json").read_text())
    assert "smooth_quant" in rep["passes"]  # a CNN has no MatMul to smooth: the count says so
    _assert_one_line_error(_build(model, "--calib", calib, "--smoothquant", "1.5", "--out", tmp_path / "bad"),
                           "--smoothquant 1.5")


def test_backend_tensorrt_without_tensorrt_says_what_is_missing_and_what_was_written(cnn, tmp_path):
    model, calib = cnn
    result = _build(model, "--calib", calib, "--backend", "tensorrt", "--out", tmp_path / "t")
    _assert_one_line_error(result, "--backend tensorrt", "tensorrt Python package", "model.int8.qdq.onnx")
    assert (tmp_path / "t" / "model.int8.qdq.onnx").is_file() and not (tmp_path / "t" / "model.engine").exists()
