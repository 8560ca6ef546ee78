"""Engine runtime and comparison without TensorRT: profile selection, benchmark plans and statistics, the CUDA calls
(checked against the installed cuda-python), one-line errors of run/bench/engine, and `trtglm compare` for real on
ONNX Runtime (the same Polygraphy comparison that runs against TensorRT on a GPU node)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from tests.unit.test_cli import _assert_one_line_error, cnn  # noqa: F401  (cnn: a fixture)
from trtglm import profiles
from trtglm.cli import main
from trtglm.engine import runtime
from trtglm.engine.build import build_engine, env_plugins
from trtglm.gpu import gpu_info
from trtglm.engine.commands import polygraphy_command, trtexec_command
from trtglm.engine.compare import compare
from trtglm.errors import ConfigError, DataError, TrtglmError

ROOT = Path(__file__).resolve().parents[2]
PREFILL = {"input_ids": ((1, 1), (4, 64), (8, 128)), "past": ((1, 2, 0, 16), (4, 2, 0, 16), (8, 2, 0, 16))}
DECODE = {"input_ids": ((1, 1), (4, 1), (8, 1)), "past": ((1, 2, 1, 16), (4, 2, 256, 16), (8, 2, 511, 16))}


# ---- planning -------------------------------------------------------------------------------------------------

def test_select_profile_picks_the_first_that_covers_every_input():
    ranges = [PREFILL, DECODE]
    assert runtime.select_profile(ranges, {"input_ids": (2, 30), "past": (2, 2, 0, 16)}) == 0
    assert runtime.select_profile(ranges, {"input_ids": (8, 1), "past": (8, 2, 100, 16)}) == 1
    assert runtime.select_profile([], {"x": (3, 4)}) == 0  # static engine


def test_select_profile_names_the_input_and_the_ranges_when_none_covers():
    with pytest.raises(DataError) as e:
        runtime.select_profile([PREFILL, DECODE], {"input_ids": (16, 1), "past": (16, 2, 5, 16)}, "engine m.engine")
    assert str(e.value).startswith("engine m.engine: no optimization profile covers input 'input_ids' of shape 16x1")
    assert "profile 0: 1x1 to 8x128; profile 1: 1x1 to 8x1" in str(e.value)


def test_bench_shapes_takes_the_batch_and_the_opt_of_the_other_axes():
    assert runtime.bench_shapes([PREFILL, DECODE], 8) == (0, {"input_ids": (8, 64), "past": (8, 2, 0, 16)})
    assert runtime.bench_shapes([{"x": ((1, 3), (8, 3), (32, 3))}], 32) == (0, {"x": (32, 3)})
    with pytest.raises(ConfigError, match=r"batch 64 is outside every optimization profile \(profile 0: 1\.\.8"):
        runtime.bench_shapes([PREFILL, DECODE], 64)


def test_latency_stats():
    times = [1.0] * 98 + [5.0, 9.0]
    s = runtime.latency_stats(times, batch=8)
    assert (s["median_ms"], s["p99_ms"], s["min_ms"], s["iterations"]) == (1.0, 5.0, 1.0, 100)
    assert s["mean_ms"] == pytest.approx(1.12) and s["throughput"] == pytest.approx(8000.0)
    with pytest.raises(ValueError):
        runtime.latency_stats([], 1)


def test_synthetic_feeds_are_deterministic_with_valid_integers():
    dtypes = {"x": np.dtype(np.float16), "ids": np.dtype(np.int64), "m": np.dtype(bool)}
    shapes = {"x": (2, 3), "ids": (2, 5), "m": (2, 5)}
    a, b = runtime.synthetic_feeds(shapes, dtypes), runtime.synthetic_feeds(shapes, dtypes)
    assert all(np.array_equal(a[n], b[n]) for n in a)
    assert a["x"].dtype == np.float16 and a["x"].std() > 0.1
    assert (a["ids"] == 1).all() and a["m"].all()


def test_read_inputs(tmp_path):
    np.savez(tmp_path / "x.npz", input=np.ones((2, 3), np.float32))
    assert runtime.read_inputs(tmp_path / "x.npz")["input"].shape == (2, 3)
    with pytest.raises(DataError, match="inputs .*nope.npz: file not found"):
        runtime.read_inputs(tmp_path / "nope.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="bad.npz: not a readable .npz file"):
        runtime.read_inputs(tmp_path / "bad.npz")


# ---- CUDA through cuda-python ----------------------------------------------------------------------------------

def _cudart_names() -> dict[str, int]:
    """Every `cudart.X` / `self.cudart.X` the engine code uses -> a line where it is used."""
    names = {}
    for path in sorted((ROOT / "trtglm" / "engine").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute):
                base = node.value
                if (isinstance(base, ast.Name) and base.id == "cudart") or (
                        isinstance(base, ast.Attribute) and base.attr == "cudart"):
                    names.setdefault(node.attr, node.lineno)
    return names


def test_cuda_calls_exist_in_cuda_python():
    """The runtime's CUDA calls against the real cuda-python module (a dev dependency; it imports without a GPU)."""
    from cuda.bindings import runtime as cudart

    used = _cudart_names()
    assert {"cudaMalloc", "cudaMemcpyAsync", "cudaStreamCreate", "cudaEventRecord", "cudaEventElapsedTime"} <= set(used)
    assert [n for n in used if not hasattr(cudart, n)] == []
    assert hasattr(cudart.cudaMemcpyKind, "cudaMemcpyHostToDevice") and hasattr(cudart.cudaError_t, "cudaSuccess")


def test_cuda_check_turns_an_error_into_one_line():
    from cuda.bindings import runtime as cudart

    with pytest.raises(TrtglmError) as e:  # no such device here (no driver) nor on a one-GPU node
        runtime.cuda_check(cudart, cudart.cudaSetDevice(10_000), "cudaSetDevice")
    assert str(e.value).startswith("CUDA cudaSetDevice: cudaError") and "\n" not in str(e.value)
    assert runtime.cuda_check(cudart, (cudart.cudaError_t.cudaSuccess, 7), "x") == 7


# ---- without TensorRT: one line, nothing written ---------------------------------------------------------------

def test_engine_session_without_tensorrt(tmp_path):
    with pytest.raises(ConfigError, match="engine .*m.engine: file not found"):
        runtime.EngineSession(tmp_path / "m.engine")
    (tmp_path / "m.engine").write_bytes(b"\0" * 16)
    if runtime.tensorrt_status()[0]:
        pytest.skip("TensorRT and a GPU are here: tests/gpu covers the engine")
    with pytest.raises(TrtglmError, match=r"m.engine: cannot run it: the tensorrt Python package is not installed"):
        runtime.EngineSession(tmp_path / "m.engine")


@pytest.mark.parametrize("args, needles", [
    (["run", "{engine}", "--inputs", "{npz}"], ["m.engine: cannot run it", "tensorrt Python package"]),
    (["bench", "{engine}", "--batch", "1,8"], ["m.engine: cannot run it", "tensorrt Python package"]),
    (["bench", "{engine}", "--batch", "1,x"], ["--batch '1,x'"]),
    (["engine", "{onnx}", "--shapes", "input:1x3x8x8/4x3x8x8/8x3x8x8"], ["not built", "tensorrt Python package"]),
    (["engine", "{onnx}", "--batch", "8:1"], ["--batch '8:1': need MIN <= OPT <= MAX"]),
    (["engine", "{onnx}", "--shapes", "input:1x3x8x8", "--batch", "1:8"], ["either --shapes or --batch"]),
    (["engine", "{onnx}", "--plugins", "{missing}"], ["plugin", "nope.so: file not found"]),
    (["engine", "{onnx}", "--plugins", "aot", "--batch", "1:8"], ["not built", "tensorrt Python package"]),
    (["engine", "{onnx}", "--implicit-int8", "{missing}"], ["calibration cache", "nope.so: file not found"]),
    (["engine", "{onnx}", "--opt-level", "7"], ["builder optimization level 7"]),
])
def test_engine_commands_fail_in_one_line_and_write_nothing(tmp_path, args, needles):
    if runtime.tensorrt_status()[0]:
        pytest.skip("TensorRT and a GPU are here")
    from tests import models

    onnx.save(models.build_cnn_classifier(), tmp_path / "m.onnx")
    (tmp_path / "m.engine").write_bytes(b"\0" * 16)
    np.savez(tmp_path / "x.npz", input=np.ones((1, 3, 8, 8), np.float32))
    values = {"engine": tmp_path / "m.engine", "npz": tmp_path / "x.npz", "onnx": tmp_path / "m.onnx",
              "missing": tmp_path / "nope.so"}
    before = sorted(p.name for p in tmp_path.iterdir())
    result = CliRunner().invoke(main, [a.format(**values) for a in args])
    _assert_one_line_error(result, *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_build_engine_refuses_a_missing_plugin_before_tensorrt(tmp_path):
    from tests import models

    onnx.save(models.build_cnn_classifier(), tmp_path / "m.onnx")
    with pytest.raises(ConfigError, match="plugin .*lib.so: file not found"):
        build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", [], plugins=(tmp_path / "lib.so",))


def test_env_plugins_keeps_the_files_that_exist(tmp_path, monkeypatch):
    (tmp_path / "a.so").write_bytes(b"")
    monkeypatch.setenv("TRTGLM_PLUGINS", f"{tmp_path / 'a.so'}:{tmp_path / 'missing.so'}:")
    assert env_plugins() == (tmp_path / "a.so",)
    monkeypatch.delenv("TRTGLM_PLUGINS")
    assert env_plugins() == ()


def test_gpu_info_is_none_without_a_driver():
    import ctypes.util

    if ctypes.util.find_library("cuda"):
        info = gpu_info()
        assert info is None or (info["name"] and info["compute_capability"].count(".") == 1)
    else:
        assert gpu_info() is None


def test_commands_with_plugins_and_implicit_int8():
    shapes = [{"x": profiles.ShapeProfile((1, 3), (4, 3), (8, 3))}]
    cmd = trtexec_command(Path("m.onnx"), Path("m.engine"), shapes, plugins=(Path("lib.so"),),
                          implicit_cache=Path("c.cache"))
    assert "--int8 --fp16 --calib=c.cache --staticPlugins=lib.so" in cmd and "--stronglyTyped" not in cmd
    cmd = polygraphy_command(Path("m.onnx"), Path("p.engine"), shapes, plugins=(Path("lib.so"),))
    assert "--strongly-typed --plugins lib.so" in cmd


# ---- --batch profiles --------------------------------------------------------------------------------------------

def _dynamic_model(seq: str | int = "seq") -> onnx.ModelProto:
    x = onnx.helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["batch", seq])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.INT64, ["batch", seq])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["ids"], ["y"])], "g", [x], [y])
    return onnx.helper.make_model(graph)


def test_batch_profile():
    p = profiles.batch_profile(_dynamic_model(16), "1:8:32")
    assert p == {"ids": profiles.ShapeProfile((1, 16), (8, 16), (32, 16))}
    assert profiles.batch_profile(_dynamic_model(16), "2:10")["ids"].opt == (6, 16)
    assert profiles.batch_profile(_dynamic_model(), "1:4", {"ids": (3, 40)})["ids"].max == (4, 40)
    with pytest.raises(ConfigError, match=r"--batch: input 'ids' axis 1 \(seq\) is dynamic too; .*--shapes ids:"):
        profiles.batch_profile(_dynamic_model(), "1:8:32")
    for bad in ("8", "a:b", "0:4", "1:2:3:4", "4:2:8"):
        with pytest.raises(ConfigError, match="--batch"):
            profiles.batch_profile(_dynamic_model(16), bad)


def test_build_records_the_batch_profile_and_rejects_bad_shapes_before_work(cnn, tmp_path):  # noqa: F811
    model, calib = cnn
    result = CliRunner().invoke(main, ["build", str(model), "--calib", str(calib), "--out", str(tmp_path / "o"),
                                       "--batch", "1:8:32", "--opt-level", "5", "--workspace", "512"])
    assert result.exit_code == 0, result.output
    engine = json.loads((tmp_path / "o" / "report.json").read_text())["engine"]
    assert engine["profiles"] == [{"input": {"min": [1, 3, 8, 8], "opt": [8, 3, 8, 8], "max": [32, 3, 8, 8]}}]
    assert ("--minShapes=input:1x3x8x8 --optShapes=input:8x3x8x8 --maxShapes=input:32x3x8x8 "
            "--builderOptimizationLevel=5 --memPoolSize=workspace:512M") in engine["trtexec"]
    bad = CliRunner().invoke(main, ["build", str(model), "--calib", str(calib), "--out", str(tmp_path / "b"),
                                    "--shapes", "input:1x3x8/4x3x8/8x3x8"])
    _assert_one_line_error(bad, "profile 0: input 'input' has rank 3, the model's is 4")
    assert not (tmp_path / "b").exists()


# ---- compare, for real on ONNX Runtime ---------------------------------------------------------------------------

@pytest.fixture()
def qdq(cnn, tmp_path):  # noqa: F811
    model, calib = cnn
    out = tmp_path / "o"
    result = CliRunner().invoke(main, ["build", str(model), "--calib", str(calib), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out / "model.int8.qdq.onnx", out / "model.fp32.opt.onnx", calib


def test_compare_passes_within_tolerance_and_lists_the_int8_nodes(qdq, tmp_path):
    candidate, reference, calib = qdq
    result = CliRunner().invoke(main, ["compare", str(candidate), str(reference), "--inputs", str(calib),
                                       "--json", str(tmp_path / "c.json")])
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["passed"] and data["runner"] == "onnxruntime" and data["samples"] == 4  # 32 samples, 8 a run
    assert [o["name"] for o in data["outputs"]] == ["logits"] and data["outputs"][0]["cosine"] > 0.999
    convs = [n.name for n in onnx.load(reference).graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    assert sorted(data["int8_layers"]) == sorted(convs)


def test_compare_fails_with_exit_1_beyond_tolerance(qdq):
    candidate, reference, calib = qdq
    result = CliRunner().invoke(main, ["compare", str(candidate), str(reference), "--inputs", str(calib),
                                       "--atol", "0", "--rtol", "0", "--error-stat", "max"])
    assert result.exit_code == 1 and "FAIL" in result.output


def test_per_layer_finds_the_layer_with_a_broken_scale(qdq, tmp_path):
    """A 64x too coarse input scale on the second convolution: every tensor before it stays within tolerance,
    its output is the first that fails, and it is where the error grows most."""
    candidate, reference, calib = qdq
    feeds = [runtime.read_inputs(_npz(calib, tmp_path))]
    clean = compare(candidate, reference, feeds, atol=0.05, rtol=0.05, per_layer=True)
    assert clean.layers and clean.first_failure is None
    model = onnx.load(candidate)
    producer = {o: n for n in model.graph.node for o in n.output}
    conv = [n for n in model.graph.node if n.op_type == "Conv"][1]
    dq = producer[conv.input[0]]
    assert dq.op_type == "DequantizeLinear"
    scale = next(t for t in model.graph.initializer if t.name == dq.input[1])
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 64, scale.name))
    q = producer[dq.input[0]]
    q_scale = next(t for t in model.graph.initializer if t.name == q.input[1])
    if q_scale.name != scale.name:
        q_scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(q_scale) * 64, q_scale.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(model, broken)
    result = compare(broken, reference, feeds, atol=0.05, rtol=0.05, per_layer=True)
    assert result.first_failure is not None and result.first_failure.name == conv.output[0]
    assert max(result.layers, key=lambda d: d.growth).name == conv.output[0]
    names = [d.name for d in result.layers]
    assert all(d.passed for d in result.layers[:names.index(conv.output[0])])


def _npz(calib: Path, tmp_path: Path) -> Path:
    np.savez(tmp_path / "x.npz", input=np.load(calib / "input.npy")[:16])
    return tmp_path / "x.npz"


def test_compare_errors_in_one_line(qdq, tmp_path):
    candidate, reference, calib = qdq
    (tmp_path / "m.engine").write_bytes(b"\0")
    cases = [
        (["compare", str(tmp_path / "m.engine"), str(reference), "--inputs", str(calib), "--per-layer"],
         ["per-layer mode rebuilds the engine", "--runner tensorrt"]),
        (["compare", str(candidate), str(tmp_path / "nope.onnx"), "--inputs", str(_npz(calib, tmp_path))],
         ["reference", "nope.onnx: file not found"]),
        (["compare", str(candidate), str(reference), "--inputs", str(tmp_path / "none")], ["none"]),
    ]
    if not runtime.tensorrt_status()[0]:
        cases.append((["compare", str(candidate), str(reference), "--inputs", str(calib), "--runner", "tensorrt"],
                      ["cannot run it on TensorRT", "tensorrt Python package"]))
    for args, needles in cases:
        _assert_one_line_error(CliRunner().invoke(main, args), *needles)
