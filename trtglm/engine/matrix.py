"""`trtglm build-matrix`: one Q/DQ artefact and calibration, then one TensorRT engine per GPU kind, each built by a
Ray task on a node of that kind (`num_gpus=1`, `accelerator_type`), gathered as `<out>/<kind>/model.engine`.

Why per kind: an engine is specific to the GPU architecture and TensorRT version it was built with, so a fleet of
A100, H100 and L4 nodes needs one build on each. Ray places each task on a node whose `accelerator_type:<kind>`
resource matches (Ray sets it from the GPU's name; docker/kuberay sets it per worker group). A kind with no node
never schedules: after `timeout` seconds the command names every kind it could not build and exits non-zero,
never hangs, and the Q/DQ artefact stays. Engines are written by the driver, atomically, beside their sidecars.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from trtglm.config import EngineOptions, ShapeProfile
from trtglm.engine.build import build_engine, layers_path, write_engine
from trtglm.errors import ConfigError, TrtglmError

KIND = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def parse_gpus(text: str) -> list[str]:
    """`A100,H100,L4` -> ['A100', 'H100', 'L4'] (Ray's accelerator type names; duplicates dropped)."""
    kinds = list(dict.fromkeys(k.strip() for k in text.split(",") if k.strip()))
    bad = [k for k in kinds if not KIND.fullmatch(k)]
    if not kinds or bad:
        raise ConfigError(f"--gpus {text!r}: give GPU kinds as Ray names them, e.g. A100,H100,L4")
    return kinds


def build_on_gpu(onnx_bytes: bytes, profiles: list[dict[str, ShapeProfile]], opts: EngineOptions,
                 recorded_as: tuple[str, str]) -> tuple[bytes, dict, list]:
    """Runs in a Ray task on a GPU node: build the engine there; return its bytes, sidecar and layer records."""
    import json

    with tempfile.TemporaryDirectory() as tmp:
        onnx_path, engine_path = Path(tmp) / "model.onnx", Path(tmp) / "model.engine"
        onnx_path.write_bytes(onnx_bytes)
        sidecar = build_engine(onnx_path, engine_path, profiles, opts.opt_level, opts.workspace_mb, None,
                               opts.plugins, opts.implicit_cache, recorded_as=tuple(map(Path, recorded_as)))
        return engine_path.read_bytes(), sidecar, json.loads(layers_path(engine_path).read_text())


def build_matrix(qdq: Path, out: Path, kinds: list[str], profiles: list[dict[str, ShapeProfile]],
                 opts: EngineOptions, timeout: float, address: str | None = None) -> dict[str, Path]:
    """One engine per kind, built on Ray; {kind: engine path}. Raises TrtglmError naming the kinds that no node
    built within `timeout` seconds (the engines that were built are written all the same)."""
    from trtglm.calib.ray_executor import import_ray, init_ray

    ray = import_ray()
    init_ray(ray, address, workers=1)
    task = ray.remote(build_on_gpu)
    data = Path(qdq).read_bytes()
    refs = {}
    for kind in kinds:
        recorded = (str(qdq), str(Path(out) / kind / "model.engine"))
        refs[kind] = task.options(num_gpus=1, accelerator_type=kind, max_retries=1).remote(data, profiles, opts,
                                                                                          recorded)
    ready, pending = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout)
    built, failed = {}, []
    for kind, ref in refs.items():
        if ref not in ready:
            ray.cancel(ref, force=True)
            continue
        try:
            engine, sidecar, layers = ray.get(ref)
        except Exception as e:  # a build that failed on its node: TrtglmError or a Ray error, one line each
            failed.append(f"{kind}: {str(e).strip().splitlines()[-1]}")
            continue
        target = Path(out) / kind / "model.engine"
        write_engine(target, engine, sidecar, layers)
        built[kind] = target
    missing = [kind for kind, ref in refs.items() if ref in pending]
    if missing or failed:
        problems = ([f"no node with GPU kind(s) {', '.join(missing)} built an engine within {timeout:g} s "
                     f"(cluster resources: {_gpu_resources(ray)})"] if missing else []) + failed
        done = f"; built {', '.join(built)}" if built else ""
        raise TrtglmError(f"build-matrix: {'; '.join(problems)}{done}; the Q/DQ model is in {qdq}")
    return built


def _gpu_resources(ray) -> str:
    resources = ray.cluster_resources()
    kinds = sorted(k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:"))
    gpus = int(resources.get("GPU", 0))
    return f"{gpus} GPU(s)" + (f" of kind(s) {', '.join(kinds)}" if kinds else "")
