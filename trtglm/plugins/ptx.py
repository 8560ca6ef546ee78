"""PTX of trtglm's CUDA kernels, compiled by nvcc from plugins/<op>/<op>.cu and cached by content.

Why PTX: TensorRT's ahead-of-time Python plugins embed PTX in the engine (no plugin library at run time), and the
GPU tests load the same PTX directly (cupy RawModule), so the kernels a test checks are the kernels an engine
runs. The cache key is the sources' bytes, the architecture and nvcc's version, so an edit recompiles.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from trtglm.errors import ConfigError, TrtglmError

# The CMake project (kernels in plugins/<op>/<op>.cu): beside the package in a checkout, or where
# $TRTGLM_PLUGIN_SOURCES says (the Docker image copies it to /opt/trtglm/plugins).
SOURCES = Path(os.environ.get("TRTGLM_PLUGIN_SOURCES") or Path(__file__).resolve().parents[2] / "plugins")
ARCHS = ("sm_80", "sm_90")
NVCC_FLAGS = ("-std=c++17", "-O3", "--use_fast_math", "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra")


def nvcc() -> str:
    """Path of nvcc: $CUDACXX, then PATH, then $CUDA_HOME/bin, then /usr/local/cuda/bin."""
    candidates = [os.environ.get("CUDACXX"), shutil.which("nvcc")]
    candidates += [str(Path(d) / "bin" / "nvcc") for d in (os.environ.get("CUDA_HOME"), "/usr/local/cuda") if d]
    for c in candidates:
        if c and Path(c).is_file():
            return c
    raise TrtglmError("nvcc not found (set CUDACXX or CUDA_HOME, or put nvcc on PATH): the plugin kernels are "
                      "compiled to PTX by nvcc")


def kernel_source(op: str) -> Path:
    path = SOURCES / op / f"{op}.cu"
    if not path.is_file():
        raise ConfigError(f"plugin kernel {op}: {path} not found")
    return path


def compile_ptx(op: str, arch: str = "sm_80", cache: Path | None = None) -> str:
    """The PTX text of plugins/<op>/<op>.cu for `arch` (compiled with warnings as errors; cached)."""
    if arch not in ARCHS:
        raise ConfigError(f"arch {arch}: give one of {', '.join(ARCHS)}")
    source = kernel_source(op)
    compiler = nvcc()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256()
    for path in sorted([source, *(SOURCES / "common").glob("*.h"), *(SOURCES / "common").glob("*.cuh"),
                         *source.parent.glob("*.cuh")]):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    digest.update(f"{arch}\0{version}\0{' '.join(NVCC_FLAGS)}".encode())
    cache = Path(cache or os.environ.get("TRTGLM_CACHE", Path.home() / ".cache" / "trtglm")) / "ptx"
    target = cache / f"{op}-{arch}-{digest.hexdigest()[:16]}.ptx"
    if target.is_file():
        return target.read_text()
    cache.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    cmd = [compiler, *NVCC_FLAGS, f"-arch={arch}", "-I", str(SOURCES), "-ptx", str(source), "-o", str(tmp)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        first = next((line for line in result.stderr.splitlines() if "error" in line.lower()), result.stderr.strip())
        raise TrtglmError(f"plugin kernel {source}: nvcc failed for {arch}: {first}")
    os.replace(tmp, target)
    return target.read_text()
