"""ONNX Runtime sessions (the embedded backend) and the CPU facts that decide how ORT runs INT8."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort

from trtglm.onnx_io import PROTO_LIMIT, save_model


def session(model: onnx.ModelProto, optimize: bool, threads: int = 0) -> ort.InferenceSession:
    """A CPU session. optimize=False runs every node literally (Q/DQ as float math, as TensorRT computes);
    optimize=True lets ORT fuse Q/DQ into its INT8 kernels, as a user deploying on ORT-CPU runs it."""
    quiet()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    opts.intra_op_num_threads = threads
    opts.use_deterministic_compute = True
    opts.log_severity_level = 3
    providers = ["CPUExecutionProvider"]
    if model.ByteSize() < PROTO_LIMIT:
        return ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
    with tempfile.TemporaryDirectory() as tmp:  # over 2 GB: ORT must read external data from disk
        path = save_model(model, Path(tmp) / "model.onnx")
        return ort.InferenceSession(str(path), opts, providers=providers)


def quiet() -> None:
    """Errors only from ONNX Runtime's default logger: its graph transformers (also in the sessions that
    onnx-graphsurgeon's constant folding opens) warn there about rewrites they skip, which is no news to a user."""
    ort.set_default_logger_severity(3)


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def has_vnni() -> bool:
    """x86 VNNI (or Arm dot product) lets ORT accumulate u8*s8 products in int32 without int16 saturation."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp"})


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()
