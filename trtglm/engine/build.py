"""Build a serialized TensorRT engine from the (Q/DQ) ONNX, with its JSON sidecar.

Why: the engine is the artefact users deploy; everything that decides precision already happened in the ONNX
graph (explicit Q/DQ, FP16 tensors), so this step is thin and mechanical: parse, set the optimization profiles,
builder optimization level, workspace limit and timing cache, build, write. The network is strongly typed so
TensorRT keeps the graph's precisions instead of choosing its own: TensorRT 11 is always strongly typed (it has no
precision builder flags), TensorRT 10 needs the STRONGLY_TYPED creation flag. The version is told apart by
feature detection (does BuilderFlag.INT8 exist), never by parsing a version string, and every `trt.` name used
here is checked against the published 10.16 and 11.4 API surfaces by tests/unit/test_engine.py: a name used on
both paths must exist in both, a name inside an `if hasattr(trt.X, "Y")` branch in the versions where it runs.

TensorRT is imported lazily: the rest of trtglm works without it, and `tensorrt_status()` says in one line what
is missing (the Python package, its native libraries, or a GPU).
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
from google.protobuf.message import DecodeError

from trtglm.config import ShapeProfile
from trtglm.engine.commands import polygraphy_command, trtexec_command
from trtglm.errors import ConfigError, ModelError, TrtglmError
from trtglm.onnx_io import atomic_path, file_sha256
from trtglm.profiles import check_profiles, model_inputs

if TYPE_CHECKING:
    import tensorrt as trt

FORMAT = "trtglm.engine/1"
MAX_OPT_LEVEL = 5  # TensorRT's builder optimization levels are 0..5 (default 3)
_log = logging.getLogger(__name__)


def tensorrt_status() -> tuple[bool, str]:
    """(True, what was found) when TensorRT imports and a CUDA GPU is visible, else (False, what is missing)."""
    if importlib.util.find_spec("tensorrt") is None:
        return False, ("the tensorrt Python package is not installed (pip install 'trtglm[tensorrt]' on a machine "
                       "with an NVIDIA GPU, or use the docker/ image)")
    try:
        import tensorrt as trt
    except (ImportError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return False, f"the tensorrt Python package is installed but its native libraries do not load ({first})"
    gpu = _gpu_problem()
    if gpu is not None:
        return False, gpu
    return True, f"TensorRT {trt.__version__} with a CUDA GPU"


def build_engine(onnx_path: Path, engine_path: Path, profiles: list[dict[str, ShapeProfile]], opt_level: int = 3,
                 workspace_mb: int | None = None, timing_cache: Path | None = None) -> dict:
    """Build `engine_path` (and `<engine_path>.json`, the returned sidecar) from `onnx_path`.

    profiles: one dict per optimization profile, input name -> ShapeProfile (profiles.read_manifest gives them).
    timing_cache: read when the file exists (a cache from another GPU or TensorRT version is replaced), and written
    back with what this build measured. Nothing is written unless the build succeeds; every file is written
    atomically. Raises ConfigError/ModelError before TensorRT is touched, TrtglmError when TensorRT is missing or
    fails, each with one line.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not 0 <= opt_level <= MAX_OPT_LEVEL:
        raise ConfigError(f"builder optimization level {opt_level}: give 0..{MAX_OPT_LEVEL} (3 is TensorRT's default)")
    if workspace_mb is not None and workspace_mb < 1:
        raise ConfigError(f"workspace {workspace_mb} MiB: give at least 1")
    if not onnx_path.is_file():
        raise ModelError(f"model {onnx_path}: file not found")
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)  # the inputs suffice to check the profiles
    except (DecodeError, OSError, ValueError) as e:
        raise ModelError(f"model {onnx_path}: not a readable ONNX file ({' '.join(str(e).split())})") from e
    dynamic = [name for name, dims in model_inputs(model).items() if dims is None or not all(
        isinstance(d, int) for d in dims)]
    if dynamic and not profiles:
        raise ConfigError(f"model {onnx_path}: input '{dynamic[0]}' has dynamic axes; give at least one shape "
                          f"profile (--shapes or the profiles manifest)")
    check_profiles(model, profiles)
    available, reason = tensorrt_status()
    if not available:
        raise TrtglmError(f"TensorRT engine {engine_path} not built: {reason}")
    trt = _tensorrt()

    start = time.perf_counter()
    logger = _logger(trt)
    try:
        builder = trt.Builder(logger)
    except (TypeError, RuntimeError) as e:
        raise TrtglmError(f"TensorRT could not create a builder ({_last(logger.errors, e)})") from e
    network, _parser = _parse(trt, builder, logger, onnx_path)  # the parser owns the weights: keep it alive
    config = builder.create_builder_config()
    config.builder_optimization_level = opt_level
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # per-layer precisions for the inspector
    if workspace_mb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    _add_profiles(trt, builder, config, network, profiles, logger)
    if timing_cache is not None:
        old = Path(timing_cache).read_bytes() if Path(timing_cache).is_file() else b""
        cache = config.create_timing_cache(old)
        if cache is None or not config.set_timing_cache(cache, False):  # another GPU or TensorRT: start afresh
            _log.warning("timing cache %s does not match this GPU/TensorRT; starting a new one", timing_cache)
            config.set_timing_cache(config.create_timing_cache(b""), False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TrtglmError(f"TensorRT could not build an engine from {onnx_path} ({_last(logger.errors)})")
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(serialized)
    if engine is None:
        raise TrtglmError(f"TensorRT built {engine_path.name} but cannot load it back ({_last(logger.errors)})")
    layers = _layers(trt, engine)
    sidecar = {
        "format": FORMAT, "tensorrt_version": trt.__version__,
        "onnx": str(onnx_path), "onnx_sha256": file_sha256(onnx_path),
        "profiles": [{name: {"min": list(p.min), "opt": list(p.opt), "max": list(p.max)} for name, p in shapes.items()}
                     for shapes in profiles],
        "opt_level": opt_level, "workspace_mb": workspace_mb,
        "timing_cache": None if timing_cache is None else str(timing_cache),
        "io": _io(engine), "layers": _layer_summary(layers), "build_seconds": round(time.perf_counter() - start, 3),
        "commands": {
            "trtexec": trtexec_command(onnx_path, engine_path, profiles, opt_level, workspace_mb, timing_cache),
            "polygraphy": polygraphy_command(onnx_path, engine_path.with_suffix(".polygraphy.engine"), profiles)},
    }
    with atomic_path(engine_path) as tmp:
        tmp.write_bytes(serialized)
    if timing_cache is not None:
        with atomic_path(Path(timing_cache)) as tmp:
            tmp.write_bytes(config.get_timing_cache().serialize())
    with atomic_path(layers_path(engine_path)) as tmp:
        tmp.write_text(json.dumps(layers, indent=1) + "\n")
    with atomic_path(sidecar_path(engine_path)) as tmp:
        tmp.write_text(json.dumps(sidecar, indent=2) + "\n")
    return sidecar


def sidecar_path(engine_path: Path) -> Path:
    """model.engine -> model.engine.json beside it."""
    return Path(engine_path).with_name(Path(engine_path).name + ".json")


def layers_path(engine_path: Path) -> Path:
    """model.engine -> model.engine.layers.json: the engine inspector's record of every layer."""
    return Path(engine_path).with_name(Path(engine_path).name + ".layers.json")


def _layers(trt, engine: trt.ICudaEngine) -> list:
    """The engine inspector's per-layer records (DETAILED verbosity: layer types, tactics, input/output formats)."""
    inspector = engine.create_engine_inspector()
    info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    return info.get("Layers", []) if isinstance(info, dict) else []


def _layer_summary(layers: list) -> dict:
    """How many layers TensorRT runs with INT8 tensors: a record naming an Int8 format or data type. Searched as
    text because the record schema differs between TensorRT 10 and 11 (the full records are in .layers.json)."""
    return {"count": len(layers), "int8": sum("int8" in json.dumps(layer).lower() for layer in layers)}


def _parse(trt, builder: trt.Builder, logger, onnx_path: Path) -> tuple:
    """(network, parser) from the ONNX file; every parser error is reported with its node, on one line."""
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        problems = []
        for i in range(parser.num_errors):
            error = parser.get_error(i)
            node = f"node {error.node()} '{error.node_name()}' ({error.node_operator()}): " if error.node() >= 0 else ""
            problems.append(f"{node}{error.desc()}")
        raise ModelError(f"TensorRT's ONNX parser rejected {onnx_path}: {'; '.join(problems) or _last(logger.errors)}")
    return network, parser


def _add_profiles(trt, builder: trt.Builder, config: trt.IBuilderConfig, network: trt.INetworkDefinition,
                  profiles: list[dict[str, ShapeProfile]], logger) -> None:
    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    for k, shapes in enumerate(profiles):
        profile = builder.create_optimization_profile()
        for name, p in shapes.items():
            if name not in inputs:
                raise ConfigError(f"profile {k}: input '{name}' is not an input of the TensorRT network "
                                  f"(it has {', '.join(inputs)})")
            profile.set_shape(name, trt.Dims(p.min), trt.Dims(p.opt), trt.Dims(p.max))
        if config.add_optimization_profile(profile) < 0:
            raise ConfigError(f"profile {k}: TensorRT rejected it ({_last(logger.errors)})")


def _io(engine: trt.ICudaEngine) -> list[dict]:
    """Name, mode (input/output), dtype and shape (-1: dynamic) of every I/O tensor of the built engine."""
    io = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        io.append({"name": name, "mode": engine.get_tensor_mode(name).name.lower(),
                   "dtype": engine.get_tensor_dtype(name).name.lower(), "shape": list(engine.get_tensor_shape(name))})
    return io


def _tensorrt():
    import tensorrt as trt

    return trt


def _network_flags(trt) -> int:
    """Creation flags: STRONGLY_TYPED on 10.x, which still has weak typing (its precision builder flags)."""
    if hasattr(trt.BuilderFlag, "INT8"):
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return 0  # 11.x: every network is strongly typed, the flag is deprecated and ignored


def _logger(trt) -> trt.ILogger:
    """A TensorRT logger that keeps error messages (for one-line errors) and sends warnings to Python logging."""

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.ERROR, trt.ILogger.INTERNAL_ERROR):
                self.errors.append(msg)
            elif severity == trt.ILogger.WARNING:
                _log.warning("TensorRT: %s", msg)

    return _Logger()


def _gpu_problem() -> str | None:
    """None when the CUDA driver sees a GPU, else what is missing (asked through the driver API, not TensorRT)."""
    for name in ("libcuda.so.1", "nvcuda.dll"):
        try:
            cuda = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        return "no NVIDIA driver found (libcuda is missing), so there is no GPU to build the engine on"
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
        return "the NVIDIA driver is installed but sees no CUDA GPU"
    return None


def _last(errors: list[str], exc: Exception | None = None) -> str:
    text = errors[-1] if errors else (str(exc) if exc else "no error message; rerun with --debug for TensorRT's log")
    return " ".join(text.split())
