"""Run and time a serialized TensorRT engine: device buffers from cuda-python, execute_async_v3 on a CUDA stream,
CUDA events around each launch.

Why this shape: TensorRT's runtime is asynchronous and pointer-based. An engine with dynamic axes has one or more
optimization profiles; a request picks the first profile whose [min, max] range covers its shapes, sets the input
shapes on the execution context, and reads the output shapes back from it. Device buffers are allocated on demand
and reused while they are large enough, so a benchmark loop times the engine and nothing else (the host<->device
copies are outside the events, as trtexec's "GPU Compute Time"). Planning (which profile, which shapes, which
statistics) is plain Python on the profile ranges, so it is tested without TensorRT; everything that touches
TensorRT or CUDA is in EngineSession.

cuda-python is imported as `from cuda.bindings import runtime as cudart` (cuda-python >= 12.6): each call returns
(error, *values) and every error becomes one TrtglmError line naming the call.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from trtglm.engine.build import last_error, load_plugins, make_logger, read_sidecar, tensorrt_status
from trtglm.errors import ConfigError, DataError, TrtglmError

if TYPE_CHECKING:
    import tensorrt as trt

Dims = tuple[int, ...]
Range = tuple[Dims, Dims, Dims]  # min, opt, max


# ---- planning: plain Python on the profiles' ranges ------------------------------------------------------------

def select_profile(ranges: list[dict[str, Range]], shapes: dict[str, Dims], where: str = "engine") -> int:
    """The first optimization profile whose min..max covers every input shape (inputs a profile does not list
    are static). One line naming the input and the ranges when none does."""
    if not ranges:
        return 0
    for k, profile in enumerate(ranges):
        if all(_covers(profile[name], shapes[name]) for name in profile if name in shapes):
            return k
    name = next((n for n in sorted(ranges[0]) if n in shapes), None)
    offered = "; ".join(f"profile {k}: {_fmt_range(p[name])}" for k, p in enumerate(ranges) if name in p)
    raise DataError(f"{where}: no optimization profile covers input '{name}' of shape {_fmt(shapes[name])} "
                    f"({offered})")


def bench_shapes(ranges: list[dict[str, Range]], batch: int, where: str = "engine") -> tuple[int, dict[str, Dims]]:
    """(profile, input shapes) for timing `batch`: the first profile whose batch axis (axis 0) spans it, every
    other axis at the profile's opt value (the shape TensorRT tuned for)."""
    for k, profile in enumerate(ranges):
        if profile and all(p[0] and p[0][0] <= batch <= p[2][0] for p in profile.values()):
            return k, {name: (batch, *opt[1:]) for name, (_, opt, _) in profile.items()}
    spans = ", ".join(f"profile {k}: {min(p[0][0] for p in prof.values())}..{max(p[2][0] for p in prof.values())}"
                      for k, prof in enumerate(ranges) if prof)
    raise ConfigError(f"{where}: batch {batch} is outside every optimization profile ({spans or 'static shapes'})")


def latency_stats(times_ms: list[float], batch: int) -> dict:
    """Median, P99, mean and min latency (ms) of one launch, and throughput (samples/s at the median). P99 is the
    nearest rank: 99% of the launches took at most that long."""
    t = np.asarray(times_ms, np.float64)
    if t.size == 0:
        raise ValueError("no timings")
    median = float(np.median(t))
    return {"batch": batch, "iterations": int(t.size), "median_ms": median,
            "p99_ms": float(np.percentile(t, 99, method="inverted_cdf")), "mean_ms": float(t.mean()),
            "min_ms": float(t.min()), "throughput": batch * 1e3 / median if median > 0 else float("inf")}


def synthetic_feeds(shapes: dict[str, Dims], dtypes: dict[str, np.dtype], seed: int = 0) -> dict[str, np.ndarray]:
    """Benchmark inputs: floats N(0, 1); integers and booleans 1 (a valid token id, mask value and position alike)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name in sorted(shapes):
        dtype = np.dtype(dtypes[name])
        feeds[name] = (rng.standard_normal(shapes[name]).astype(dtype) if np.issubdtype(dtype, np.floating)
                       else np.ones(shapes[name], dtype))
    return feeds


def read_inputs(path: Path) -> dict[str, np.ndarray]:
    """Named arrays from an .npz file (one array per engine input)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"inputs {path}: file not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError) as e:
        raise DataError(f"inputs {path}: not a readable .npz file ({' '.join(str(e).split())})") from e


def _covers(r: Range, shape: Dims) -> bool:
    lo, _, hi = r
    return len(shape) == len(lo) and all(a <= s <= b for a, s, b in zip(lo, shape, hi))


def _fmt(dims: Dims) -> str:
    return "x".join(str(d) for d in dims) or "scalar"


def _fmt_range(r: Range) -> str:
    return f"{_fmt(r[0])} to {_fmt(r[2])}"


# ---- TensorRT + CUDA -------------------------------------------------------------------------------------------

@dataclass
class _Buffer:
    pointer: int
    nbytes: int


class EngineSession:
    """One deserialized engine, its execution context, a CUDA stream and reusable device buffers.

    plugins: plugin libraries (.so) or Python plugin modules to load first; the sidecar's are added.
    """

    def __init__(self, engine_path: Path, plugins: tuple[Path, ...] = ()):
        self.path = Path(engine_path)
        if not self.path.is_file():
            raise ConfigError(f"engine {self.path}: file not found")
        available, reason = tensorrt_status()
        if not available:
            raise TrtglmError(f"engine {self.path}: cannot run it: {reason}")
        import tensorrt as trt

        self.cudart = _cudart()
        self.sidecar = read_sidecar(self.path)
        self.logger = make_logger(trt)
        runtime = trt.Runtime(self.logger)
        load_plugins(runtime.get_plugin_registry(),
                     tuple(plugins) + tuple(Path(p) for p in self.sidecar.get("plugins", ())), self.logger)
        engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if engine is None:
            raise TrtglmError(f"engine {self.path}: TensorRT cannot load it; it must be built by this TensorRT "
                              f"version for this GPU ({last_error(self.logger.errors)})")
        self.runtime = runtime
        self.engine = engine
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        dynamic = [n for n in self.inputs if any(d < 0 for d in engine.get_tensor_shape(n))]
        self.ranges = [{n: tuple(tuple(d) for d in engine.get_tensor_profile_shape(n, k)) for n in dynamic}
                       for k in range(engine.num_optimization_profiles)]
        self.static = {n: tuple(engine.get_tensor_shape(n)) for n in self.inputs if n not in dynamic}
        self.stream = self._call(self.cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.buffers: dict[str, _Buffer] = {}
        self.profile = -1

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs for one set of inputs (copied in, run, copied out, stream synchronized)."""
        feeds = self._check(feeds)
        shapes = self._prepare({n: tuple(a.shape) for n, a in feeds.items()})
        self._upload(feeds)
        self._execute()
        outputs = {n: np.empty(shapes[n], self.dtypes[n]) for n in self.outputs}
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name, array in outputs.items():
            if array.nbytes:
                self._call(self.cudart.cudaMemcpyAsync(array.ctypes.data, self.buffers[name].pointer, array.nbytes,
                                                       kind, self.stream), f"copy of output '{name}'")
        self._call(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return outputs

    def time(self, feeds: dict[str, np.ndarray], warmup: int, iterations: int) -> list[float]:
        """Milliseconds of each of `iterations` launches (after `warmup` untimed ones), measured by CUDA events
        recorded on the stream around execute_async_v3; the inputs are copied once, before."""
        feeds = self._check(feeds)
        self._prepare({n: tuple(a.shape) for n, a in feeds.items()})
        self._upload(feeds)
        for _ in range(warmup):
            self._execute()
        cudart = self.cudart
        events = [(self._call(cudart.cudaEventCreate(), "cudaEventCreate"),
                   self._call(cudart.cudaEventCreate(), "cudaEventCreate")) for _ in range(iterations)]
        try:
            for start, end in events:
                self._call(cudart.cudaEventRecord(start, self.stream), "cudaEventRecord")
                self._execute()
                self._call(cudart.cudaEventRecord(end, self.stream), "cudaEventRecord")
            self._call(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
            return [float(self._call(cudart.cudaEventElapsedTime(start, end), "cudaEventElapsedTime"))
                    for start, end in events]
        finally:
            for pair in events:
                for event in pair:
                    cudart.cudaEventDestroy(event)

    def close(self) -> None:
        for buffer in self.buffers.values():
            self.cudart.cudaFree(buffer.pointer)
        self.buffers = {}
        if self.stream is not None:
            self.cudart.cudaStreamDestroy(self.stream)
            self.stream = None

    def __enter__(self) -> EngineSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every engine input present, in the engine's dtype (same-kind casts only), C-contiguous."""
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise DataError(f"engine {self.path.name}: input '{missing[0]}' is missing (it takes "
                            f"{', '.join(self.inputs)})")
        out = {}
        for name in self.inputs:
            array, dtype = np.asarray(feeds[name]), self.dtypes[name]
            if array.dtype != dtype and not np.can_cast(array.dtype, dtype, "same_kind"):
                raise DataError(f"engine {self.path.name}: input '{name}' is {array.dtype}, the engine takes {dtype}")
            out[name] = np.ascontiguousarray(array, dtype)
        return out

    def _prepare(self, shapes: dict[str, Dims]) -> dict[str, Dims]:
        """Select the profile, set the input shapes, size the buffers and bind them; the output shapes."""
        for name, static in self.static.items():
            if shapes[name] != static:
                raise DataError(f"engine {self.path.name}: input '{name}' has shape {_fmt(shapes[name])}, the "
                                f"engine's is {_fmt(static)}")
        profile = select_profile(self.ranges, shapes, f"engine {self.path.name}")
        if profile != self.profile:
            if not self.context.set_optimization_profile_async(profile, int(self.stream)):
                raise TrtglmError(f"engine {self.path.name}: cannot select profile {profile} "
                                  f"({last_error(self.logger.errors)})")
            self.profile = profile
        for name in self.inputs:
            if not self.context.set_input_shape(name, shapes[name]):
                raise DataError(f"engine {self.path.name}: TensorRT rejects shape {_fmt(shapes[name])} for input "
                                f"'{name}' ({last_error(self.logger.errors)})")
        out = dict(shapes)
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise TrtglmError(f"engine {self.path.name}: output '{name}' has a data-dependent shape "
                                  f"{_fmt(shape)}, which `trtglm run` does not support")
            out[name] = shape
        for name in self.inputs + self.outputs:
            nbytes = int(np.prod(out[name], dtype=np.int64)) * self.dtypes[name].itemsize
            buffer = self.buffers.get(name)
            if buffer is None or buffer.nbytes < nbytes:
                if buffer is not None:
                    self.cudart.cudaFree(buffer.pointer)
                pointer = self._call(self.cudart.cudaMalloc(max(nbytes, 1)), f"cudaMalloc for '{name}'")
                self.buffers[name] = buffer = _Buffer(int(pointer), max(nbytes, 1))
            self.context.set_tensor_address(name, buffer.pointer)
        return out

    def _upload(self, feeds: dict[str, np.ndarray]) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        for name, array in feeds.items():
            if array.nbytes:
                self._call(self.cudart.cudaMemcpyAsync(self.buffers[name].pointer, array.ctypes.data, array.nbytes,
                                                       kind, self.stream), f"copy of input '{name}'")
        self._call(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def _execute(self) -> None:
        if not self.context.execute_async_v3(int(self.stream)):
            raise TrtglmError(f"engine {self.path.name}: execution failed ({last_error(self.logger.errors)})")

    def _call(self, result, what: str):
        return cuda_check(self.cudart, result, what)


def cuda_check(cudart, result, what: str):
    """cuda-python returns (error, *values): the value(s), or one TrtglmError line naming the call."""
    error, values = result[0], result[1:]
    if error != cudart.cudaError_t.cudaSuccess:
        _, text = cudart.cudaGetErrorString(error)
        raise TrtglmError(f"CUDA {what}: {error.name} ({text.decode() if isinstance(text, bytes) else text})")
    return values[0] if len(values) == 1 else values or None


def _cudart():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError as e:
        raise TrtglmError(f"running an engine needs cuda-python >= 12.6 (pip install 'trtglm[tensorrt]'): {e}") from e
    return cudart
