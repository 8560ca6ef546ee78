"""TensorRT engine build, run, benchmark and comparison on a GPU node (skipped without TensorRT and a GPU).

Each test drives the CLI a user runs, on a small CNN calibrated here, and checks the engine against ONNX Runtime.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from tests import models
from trtglm.cli import main
from trtglm.verify import sample_cosines

pytestmark = pytest.mark.tensorrt


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A Q/DQ CNN and its engine (batch 1..32), built through `trtglm build --backend tensorrt`."""
    tmp = tmp_path_factory.mktemp("gpu")
    onnx.save(models.build_cnn_classifier(), tmp / "cnn.onnx")
    (tmp / "calib").mkdir()
    data = np.random.default_rng(0).standard_normal((64, 3, 8, 8)).astype(np.float32)
    np.save(tmp / "calib" / "input.npy", data)
    result = CliRunner().invoke(main, ["build", str(tmp / "cnn.onnx"), "--calib", str(tmp / "calib"), "--out",
                                       str(tmp / "o"), "--backend", "tensorrt", "--batch", "1:8:32",
                                       "--timing-cache", str(tmp / "timing.cache")])
    assert result.exit_code == 0, result.output
    return tmp, data


def test_build_writes_engine_sidecar_and_timing_cache(built):
    tmp, _ = built
    sidecar = json.loads((tmp / "o" / "model.engine.json").read_text())
    assert sidecar["gpu"]["name"] and sidecar["gpu"]["compute_capability"]
    assert sidecar["profiles"] == [{"input": {"min": [1, 3, 8, 8], "opt": [8, 3, 8, 8], "max": [32, 3, 8, 8]}}]
    assert [io["name"] for io in sidecar["io"]] == ["input", "logits"]
    assert sidecar["layers"]["int8"] > 0, "no layer runs INT8: the Q/DQ nodes were not fused"
    assert (tmp / "timing.cache").stat().st_size > 0
    assert (tmp / "o" / "model.engine.layers.json").is_file()


def test_run_matches_onnx_runtime(built, tmp_path):
    tmp, data = built
    np.savez(tmp_path / "x.npz", input=data[:5])
    result = CliRunner().invoke(main, ["run", str(tmp / "o" / "model.engine"), "--inputs", str(tmp_path / "x.npz"),
                                       "-o", str(tmp_path / "y.npz")])
    assert result.exit_code == 0, result.output
    got = np.load(tmp_path / "y.npz")["logits"]
    ref = models.run_ort(onnx.load(tmp / "o" / "model.fp32.opt.onnx"), {"input": data[:5]})[0]
    assert got.shape == (5, ref.shape[1]) and sample_cosines(ref, got).min() > 0.999


def test_bench_reports_every_batch(built, tmp_path):
    tmp, _ = built
    result = CliRunner().invoke(main, ["bench", str(tmp / "o" / "model.engine"), "--batch", "1,8,32",
                                       "--iterations", "20", "--json", str(tmp_path / "b.json")])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 8, 32]
    assert all(0 < r["median_ms"] <= r["p99_ms"] for r in rows)


def test_compare_engine_and_per_layer(built):
    tmp, _ = built
    o = tmp / "o"
    result = CliRunner().invoke(main, ["compare", str(o / "model.engine"), str(o / "model.fp32.opt.onnx"),
                                       "--inputs", str(tmp / "calib")])
    assert result.exit_code == 0 and "PASS" in result.output, result.output
    result = CliRunner().invoke(main, ["compare", str(o / "model.int8.qdq.onnx"), str(o / "model.fp32.opt.onnx"),
                                       "--inputs", str(tmp / "calib"), "--per-layer", "--runner", "tensorrt"])
    assert result.exit_code == 0 and "largest error growth" in result.output, result.output


def test_two_profiles_and_a_batch_outside_them(built, tmp_path):
    tmp, data = built
    qdq = tmp / "o" / "model.int8.qdq.onnx"
    result = CliRunner().invoke(main, ["engine", str(qdq), "-o", str(tmp_path / "two.engine"),
                                       "--shapes", "input:1x3x8x8/2x3x8x8/4x3x8x8",
                                       "--shapes", "input:5x3x8x8/16x3x8x8/64x3x8x8"])
    assert result.exit_code == 0, result.output
    assert len(json.loads((tmp_path / "two.engine.json").read_text())["profiles"]) == 2
    result = CliRunner().invoke(main, ["bench", str(tmp_path / "two.engine"), "--batch", "2,40", "--iterations", "5",
                                       "--json", str(tmp_path / "b.json")])
    assert result.exit_code == 0, result.output
    assert [r["profile"] for r in json.loads((tmp_path / "b.json").read_text())["rows"]] == [0, 1]
    result = CliRunner().invoke(main, ["bench", str(tmp_path / "two.engine"), "--batch", "100"])
    assert result.exit_code != 0 and "outside every optimization profile" in result.stderr
