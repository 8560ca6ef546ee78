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

import importlib.util
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
from google.protobuf.message import DecodeError

from trtglm.config import ShapeProfile
from trtglm.engine.commands import polygraphy_command, trtexec_command
from trtglm.errors import ConfigError, ModelError, TrtglmError
from trtglm.gpu import gpu_info, gpu_problem
from trtglm.onnx_io import atomic_path, file_sha256
from trtglm.profiles import check_profiles, model_inputs

if TYPE_CHECKING:
    import tensorrt as trt

FORMAT = "trtglm.engine/1"
MAX_OPT_LEVEL = 5  # TensorRT's builder optimization levels are 0..5 (default 3)
AOT_PLUGINS = "aot"  # --plugins aot: trtglm's ops as TensorRT ahead-of-time plugins (no library at run time)
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
    gpu = gpu_problem()
    if gpu is not None:
        return False, gpu
    return True, f"TensorRT {trt.__version__} with a CUDA GPU"


def build_engine(onnx_path: Path, engine_path: Path, profiles: list[dict[str, ShapeProfile]], opt_level: int = 3,
                 workspace_mb: int | None = None, timing_cache: Path | None = None, plugins: tuple[Path, ...] = (),
                 implicit_cache: Path | None = None, recorded_as: tuple[Path, Path] | None = None) -> dict:
    """Build `engine_path` (and `<engine_path>.json`, the returned sidecar) from `onnx_path`.

    profiles: one dict per optimization profile, input name -> ShapeProfile (profiles.read_manifest gives them).
    timing_cache: read when the file exists (a cache from another GPU or TensorRT version is replaced), and written
    back with what this build measured. plugins: plugin libraries (.so) and Python plugin modules (.py) to load
    before parsing. implicit_cache: TensorRT 10 only, on request: a float ONNX built with implicit INT8 from an
    existing calibration cache (a weakly typed network); TensorRT 11 has no implicit INT8 and refuses it.
    recorded_as: the (ONNX, engine) paths the sidecar and commands name, when the build writes to a staging
    directory that is renamed afterwards. Nothing is written unless the build succeeds; every file is written atomically. Raises ConfigError/ModelError
    before TensorRT is touched, TrtglmError when TensorRT is missing or fails, each with one line.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    plugins = tuple(Path(p) for p in plugins)
    for path in plugins + ((Path(implicit_cache),) if implicit_cache is not None else ()):
        if str(path) != AOT_PLUGINS and not path.is_file():
            raise ConfigError(f"{'plugin' if path in plugins else 'calibration cache'} {path}: file not found")
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
    logger = make_logger(trt)
    try:
        builder = trt.Builder(logger)
    except (TypeError, RuntimeError) as e:
        raise TrtglmError(f"TensorRT could not create a builder ({last_error(logger.errors, e)})") from e
    load_plugins(builder.get_plugin_registry(), plugins, logger)
    implicit = implicit_cache is not None
    if implicit and not hasattr(trt.BuilderFlag, "INT8"):
        raise ConfigError(f"--implicit-int8: TensorRT {trt.__version__} has no implicit INT8 calibration (networks "
                          f"are always strongly typed); build the Q/DQ ONNX from the cache instead: trtglm build "
                          f"MODEL --calib-cache {implicit_cache}")
    network, _parser = _parse(trt, builder, logger, onnx_path, strongly_typed=not implicit)  # parser owns weights
    config = builder.create_builder_config()
    if implicit:
        _implicit_int8(trt, config, Path(implicit_cache).read_bytes())
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
        raise TrtglmError(f"TensorRT could not build an engine from {onnx_path} ({last_error(logger.errors)})")
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(serialized)
    if engine is None:
        raise TrtglmError(f"TensorRT built {engine_path.name} but cannot load it back ({last_error(logger.errors)})")
    layers = _layers(trt, engine)
    shown_onnx, shown_engine = recorded_as or (onnx_path, engine_path)
    sidecar = {
        "format": FORMAT, "tensorrt_version": trt.__version__, "gpu": gpu_info(),
        "onnx": str(shown_onnx), "onnx_sha256": file_sha256(onnx_path),
        "profiles": [{name: {"min": list(p.min), "opt": list(p.opt), "max": list(p.max)} for name, p in shapes.items()}
                     for shapes in profiles],
        "opt_level": opt_level, "workspace_mb": workspace_mb,
        "timing_cache": None if timing_cache is None else str(timing_cache),
        "plugins": [str(p) for p in plugins], "typing": "implicit-int8" if implicit else "strong",
        "io": _io(engine), "layers": _layer_summary(layers), "build_seconds": round(time.perf_counter() - start, 3),
        "commands": {
            "trtexec": trtexec_command(shown_onnx, shown_engine, profiles, opt_level, workspace_mb, timing_cache,
                                       plugins, implicit_cache),
            "polygraphy": polygraphy_command(shown_onnx, shown_engine.with_suffix(".polygraphy.engine"), profiles,
                                             plugins, implicit_cache)},
    }
    timing = (Path(timing_cache), bytes(config.get_timing_cache().serialize())) if timing_cache is not None else None
    write_engine(engine_path, bytes(serialized), sidecar, layers, timing)
    return sidecar


def write_engine(engine_path: Path, serialized: bytes, sidecar: dict, layers: list,
                 timing: tuple[Path, bytes] | None = None) -> None:
    """The engine, its layer records, the timing cache and, last, the sidecar, each written atomically: a reader
    that finds the sidecar finds a complete engine beside it. The JSON is made first: it cannot fail half-way."""
    layers_text, sidecar_text = json.dumps(layers, indent=1) + "\n", json.dumps(sidecar, indent=2) + "\n"
    with atomic_path(engine_path) as tmp:
        tmp.write_bytes(serialized)
    if timing is not None:
        with atomic_path(timing[0]) as tmp:
            tmp.write_bytes(timing[1])
    with atomic_path(layers_path(engine_path)) as tmp:
        tmp.write_text(layers_text)
    with atomic_path(sidecar_path(engine_path)) as tmp:
        tmp.write_text(sidecar_text)


def sidecar_path(engine_path: Path) -> Path:
    """model.engine -> model.engine.json beside it."""
    return Path(engine_path).with_name(Path(engine_path).name + ".json")


def read_sidecar(engine_path: Path) -> dict:
    """The sidecar of an engine; {} for an engine built by trtexec or another tool (the engine itself suffices)."""
    path = sidecar_path(engine_path)
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def layers_path(engine_path: Path) -> Path:
    """model.engine -> model.engine.layers.json: the engine inspector's record of every layer."""
    return Path(engine_path).with_name(Path(engine_path).name + ".layers.json")


def _layers(trt, engine: trt.ICudaEngine) -> list:
    """The engine inspector's per-layer records (DETAILED verbosity: layer types, tactics, input/output formats)."""
    inspector = engine.create_engine_inspector()
    info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    return info.get("Layers", []) if isinstance(info, dict) else []


def _layer_summary(layers: list) -> dict:
    return {"count": len(layers), "int8": len(int8_layers(layers))}


def int8_layers(layers: list) -> list[str]:
    """Names of the inspector's layer records that run with INT8 tensors: a record naming an Int8 format or data
    type. Searched as text because the record schema differs between TensorRT 10 and 11."""
    return [layer.get("Name", str(layer)) if isinstance(layer, dict) else str(layer)
            for layer in layers if "int8" in json.dumps(layer).lower()]


def env_plugins() -> tuple[Path, ...]:
    """Plugin files named in $TRTGLM_PLUGINS (os.pathsep-separated) that exist: the Docker image points it at the
    plugin library it built, and an image built without plugins simply has none there."""
    return tuple(Path(p) for p in os.environ.get("TRTGLM_PLUGINS", "").split(os.pathsep) if p and Path(p).is_file())


def load_plugins(registry: trt.IPluginRegistry, plugins: tuple[Path, ...], logger) -> None:
    """NVIDIA's bundled plugins, then each plugin library (.so: IPluginV3 creators) or Python module (.py: plugins
    registered with tensorrt.plugin's decorators when imported); `aot`: trtglm's own ops as ahead-of-time plugins
    (trtglm.plugins.tensorrt_aot), embedded in the engine."""
    import tensorrt as trt

    trt.init_libnvinfer_plugins(logger, "")
    for path in plugins:
        if str(path) == AOT_PLUGINS:
            importlib.import_module("trtglm.plugins.tensorrt_aot")
        elif path.suffix == ".py":
            _import_module(path)
        elif registry.load_library(str(path)) is None:
            raise TrtglmError(f"plugin {path}: TensorRT could not load it ({last_error(logger.errors)})")


def _import_module(path: Path) -> None:
    spec = importlib.util.spec_from_file_location(f"trtglm_plugin_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # a user's module: any error it raises is reported as one line
        raise TrtglmError(f"plugin module {path}: importing it failed ({type(e).__name__}: {e})") from e


def _implicit_int8(trt, config: trt.IBuilderConfig, cache: bytes) -> None:
    """TensorRT 10: INT8 (and FP16 for what has no scale) chosen by TensorRT from the cache's per-tensor scales."""
    if hasattr(trt, "IInt8EntropyCalibrator2"):
        class CacheCalibrator(trt.IInt8EntropyCalibrator2):
            """Reads an existing cache; never asks for data (get_batch None), never writes."""

            def __init__(self):
                trt.IInt8EntropyCalibrator2.__init__(self)

            def get_batch_size(self):
                return 1

            def get_batch(self, names):
                return None

            def read_calibration_cache(self):
                return cache

            def write_calibration_cache(self, data):
                return None

        config.set_flag(trt.BuilderFlag.INT8)
        config.set_flag(trt.BuilderFlag.FP16)
        config.int8_calibrator = CacheCalibrator()


def _parse(trt, builder: trt.Builder, logger, onnx_path: Path, strongly_typed: bool = True) -> tuple:
    """(network, parser) from the ONNX file; every parser error is reported with its node, on one line."""
    network = builder.create_network(_network_flags(trt, strongly_typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        problems = []
        for i in range(parser.num_errors):
            error = parser.get_error(i)
            node = f"node {error.node()} '{error.node_name()}' ({error.node_operator()}): " if error.node() >= 0 else ""
            problems.append(f"{node}{error.desc()}")
        raise ModelError(f"TensorRT's ONNX parser rejected {onnx_path}: {'; '.join(problems) or last_error(logger.errors)}")
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
            raise ConfigError(f"profile {k}: TensorRT rejected it ({last_error(logger.errors)})")


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


def _network_flags(trt, strongly_typed: bool = True) -> int:
    """Creation flags: STRONGLY_TYPED on 10.x, which still has weak typing (its precision builder flags), unless
    implicit INT8 was asked for."""
    if hasattr(trt.BuilderFlag, "INT8"):
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    return 0  # 11.x: every network is strongly typed, the flag is deprecated and ignored


def make_logger(trt) -> trt.ILogger:
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


def last_error(errors: list[str], exc: Exception | None = None) -> str:
    text = errors[-1] if errors else (str(exc) if exc else "no error message; rerun with --debug for TensorRT's log")
    return " ".join(text.split())
