"""What the benchmarks share: running a tool in a child process and measuring it, reading trtglm's report, ONNX
Runtime sessions, Q/DQ inspection, and the machine and versions a result came from.

Imported by bench/calibration.py and bench/minilm.py, which run as scripts (bench/ is then on sys.path).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SEED = 0


# ----------------------------------------------------------------------------------------------- measurement
def peak_rss_mb() -> float:
    """This process's peak RSS so far: right after a tool's quantize call, what that call needed at most."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(cmd: list[str], log: Path, timeout_s: float, cwd: Path = REPO) -> dict:
    """Run cmd in cwd; its wall time, exit code, and peak RSS (ru_maxrss of the child and what it waited for)."""
    env = dict(os.environ, PYTHONHASHSEED=str(SEED), CUDA_VISIBLE_DEVICES="")
    with open(log, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        deadline, next_look, torch_loaded = start + timeout_s, start, False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            now = time.perf_counter()
            if now > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            if not torch_loaded and now >= next_look:
                torch_loaded, next_look = _maps_torch(proc.pid), now + 0.1
            time.sleep(0.005)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
    return {"process_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024, "rc": proc.returncode,
            "timed_out": wall > timeout_s, "torch_loaded": torch_loaded}


def _maps_torch(pid: int) -> bool:
    """Whether the process has mapped libtorch: importing torch costs a few hundred MB of RSS and seconds."""
    try:
        return "/torch/lib/libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------- trtglm
def trtglm_exe() -> str:
    """The trtglm console script of the running interpreter's venv, else the one on PATH."""
    exe = Path(sys.executable).with_name("trtglm")
    return str(exe) if exe.exists() else (shutil.which("trtglm") or "trtglm")


def trtglm_stage_times(out_dir: Path) -> dict:
    """report.json's per-stage seconds: the calibration stage, and all stages but verification."""
    try:
        report = json.loads((out_dir / "report.json").read_text())
    except (OSError, ValueError):
        return {"quantize_s": None, "calib_stage_s": None}
    timings = report.get("timings") or report.get("timings_s") or {}
    timings = {k: v for k, v in timings.items() if isinstance(v, (int, float))}
    calib = next((timings[k] for k in ("calibration", "calibrate", "calib", "collect") if k in timings), None)
    build = sum(v for k, v in timings.items() if not k.startswith(("verify", "report", "total"))) or None
    after = report.get("peak_rss_mb_after_stage") or {}
    return {"quantize_s": build, "calib_stage_s": calib, "stages_s": timings,
            "quantize_peak_rss_mb": after.get("quantize"), "report_peak_rss_mb": report.get("peak_rss_mb")}


# ----------------------------------------------------------------------------------------------- evaluation
def session(model: str, optimized: bool):
    """ONNX Runtime CPU session; optimized=False executes Q/DQ literally as float math, as TensorRT computes."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    opts.log_severity_level = 3
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def qdq_summary(model: str) -> dict:
    """Q/DQ node counts, and what (if anything) keeps TensorRT from taking them: it wants INT8, zero points 0."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(model).graph
    consts = {i.name: i for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute:
            consts[node.output[0]] = node.attribute[0].t
    quant = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    dequant = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    problems = set()
    for node in quant + dequant:
        if len(node.input) < 3 or not node.input[2]:
            # no zero point: a QuantizeLinear outputs UINT8 unless output_dtype says INT8
            dtype = next((a.i for a in node.attribute if a.name == "output_dtype"), 0)
            if node.op_type == "QuantizeLinear" and dtype != onnx.TensorProto.INT8:
                problems.add("uint8")
            continue
        zp = consts.get(node.input[2])
        if zp is None:
            problems.add("computed zero point")
            continue
        arr = numpy_helper.to_array(zp)
        if arr.dtype != np.int8:
            problems.add(str(arr.dtype))
        if np.any(arr):
            problems.add("zp!=0")
    return {"quantize_nodes": len(quant), "dequantize_nodes": len(dequant),
            "trt_int8_symmetric": not problems, "trt_problems": sorted(problems)}


# ----------------------------------------------------------------------------------------------- reporting
def cpu_info() -> dict:
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name in ("", platform.machine(), platform.processor()):
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    vnni = sorted(flags & {"avx512_vnni", "avx_vnni"})
    return {"name": name, "cores": os.cpu_count(), "vnni": bool(vnni), "vnni_flags": vnni}


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("trtglm", "nvidia-modelopt", "onnxruntime", "onnx", "numpy", "torch"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


def fmt(v, spec=".2f") -> str:
    return "—" if v is None else format(v, spec)


def yes_no(flag) -> str:
    return "yes" if flag else "no"


def warm_imports(args=None) -> dict:
    """A worker that is not timed: imports every tool's modules once so that no measured run pays for a cold file
    cache."""
    import importlib

    for module in ("onnxruntime.quantization", "modelopt.onnx.quantization", "trtglm.pipeline"):
        try:
            importlib.import_module(module)
        except ImportError:
            pass
    return {}
