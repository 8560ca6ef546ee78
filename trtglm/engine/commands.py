"""The trtexec and `polygraphy run` command lines equivalent to a trtglm engine build.

Why: every build records them (in the engine's sidecar) so that a user on a GPU node can rebuild or cross-check
the engine with NVIDIA's own tools. Flag spellings follow trtexec's `BuildOptions::help` (NVIDIA/TensorRT
samples/common/sampleOptions.cpp: --onnx, --saveEngine, --minShapes/--optShapes/--maxShapes with `name:AxB`
specs joined by commas, --profile=N before each profile's shapes when there are several,
--builderOptimizationLevel, --memPoolSize=workspace:<size>M, --timingCacheFile, --stronglyTyped) and Polygraphy's
argument groups (tools/Polygraphy/polygraphy/tools/args/backend/trt/config.py and loader.py: --trt-min-shapes,
--trt-opt-shapes, --trt-max-shapes given once per profile with `name:[D0,D1]` values, --strongly-typed,
--save-engine). Plugin libraries: trtexec --staticPlugins (its --plugins is deprecated), polygraphy --plugins. A
TensorRT 10 implicit-INT8 build from a calibration cache: trtexec --int8 --fp16 --calib=FILE, polygraphy --int8
--fp16 --calibration-cache FILE, both without strong typing. --stronglyTyped / --strongly-typed match the strongly typed network trtglm builds: required on
TensorRT 10, a no-op on 11 where strong typing is always on (TensorRT 11.x trtexec migration guide).
The output is deterministic: profile and input order as given, paths as given.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from trtglm.config import ShapeProfile

_WHICH = ("min", "opt", "max")


def trtexec_command(onnx: Path, engine: Path, profiles: list[dict[str, ShapeProfile]], opt_level: int = 3,
                    workspace_mb: int | None = None, timing_cache: Path | None = None, plugins: tuple = (),
                    implicit_cache: Path | None = None) -> str:
    """`trtexec --onnx=... --saveEngine=...` building the same engine (shell-quoted, one line)."""
    args = ["trtexec", f"--onnx={onnx}", f"--saveEngine={engine}"]
    args += ["--int8", "--fp16", f"--calib={implicit_cache}"] if implicit_cache is not None else ["--stronglyTyped"]
    args += [f"--staticPlugins={p}" for p in _tool_plugins(plugins)]
    for k, profile in enumerate(profiles):
        if len(profiles) > 1:
            args.append(f"--profile={k}")
        for which in _WHICH:
            spec = ",".join(f"{_trtexec_name(name)}:{_trtexec_dims(getattr(p, which))}" for name, p in profile.items())
            args.append(f"--{which}Shapes={spec}")
    args.append(f"--builderOptimizationLevel={opt_level}")
    if workspace_mb is not None:
        args.append(f"--memPoolSize=workspace:{workspace_mb}M")
    if timing_cache is not None:
        args.append(f"--timingCacheFile={timing_cache}")
    return shlex.join(args)


def polygraphy_command(onnx: Path, engine: Path, profiles: list[dict[str, ShapeProfile]], plugins: tuple = (),
                       implicit_cache: Path | None = None) -> str:
    """`polygraphy run` building the engine with the same profiles, comparing TensorRT against ONNX Runtime on the
    same inputs, and saving the engine it built at `engine` (shell-quoted, one line)."""
    args = ["polygraphy", "run", str(onnx), "--trt", "--onnxrt"]
    args += (["--int8", "--fp16", "--calibration-cache", str(implicit_cache)] if implicit_cache is not None
             else ["--strongly-typed"])
    if plugins:
        args += ["--plugins", *(str(p) for p in _tool_plugins(plugins))]
    for profile in profiles:
        for which in _WHICH:
            args.append(f"--trt-{which}-shapes")
            args += [f"{name}:[{','.join(str(d) for d in getattr(p, which))}]" for name, p in profile.items()]
    args += ["--save-engine", str(engine)]
    return shlex.join(args)


def _tool_plugins(plugins: tuple) -> list[str]:
    """NVIDIA's tools load plugin libraries, not Python modules: trtglm's AOT plugins (`aot`) become the plugin
    library with the same ops (libtrtglm_plugins.so, plugins/README.md), and .py modules are left out."""
    out = []
    for p in plugins:
        name = "libtrtglm_plugins.so" if str(p) == "aot" else str(p)
        if not name.endswith(".py") and name not in out:
            out.append(name)
    return out


def _trtexec_name(name: str) -> str:
    """trtexec splits a spec at ',' and ':'; a name holding either is wrapped in single quotes."""
    return f"'{name}'" if ":" in name or "," in name else name


def _trtexec_dims(dims: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in dims) if dims else "scalar"
