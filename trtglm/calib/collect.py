"""Run the FP32 model on calibration batches and stream the requested activations into TensorStats.

ONNX Runtime on CPU is the executor so calibration runs anywhere, with graph optimizations disabled: an optimized
session fuses nodes and drops or renames intermediate tensors, and the Q/DQ pass needs statistics for the
tensors of the graph it rewrites, under their names. The requested tensors become extra graph outputs of a copy
of the model; each batch's values are folded into histograms and dropped, so memory does not grow with the
number of batches.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager

import numpy as np
import onnx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from trtglm.calib.rows import RowSample
from trtglm.calib.stats import TensorStats
from trtglm.errors import CalibrationError, DataError
from trtglm import runtime
from trtglm.onnx_io import PROTO_LIMIT

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


def collect(model: onnx.ModelProto, tensors: list[str], batches: Iterable[dict[str, np.ndarray]],
            total: int | None = None, description: str = "calibrating",
            samples: dict[str, RowSample] | None = None) -> dict[str, TensorStats]:
    """Statistics of each float tensor in `tensors` over all `batches` (dicts of input name -> array).

    `total` is the number of batches, when known, for the progress bar (stderr). `samples` (tensor name ->
    RowSample, names among `tensors`) are filled with rows of those tensors on the way.
    """
    collector = Collector(model, tensors, samples)
    with progress_bar(description, total) as advance:
        for index, batch in enumerate(batches):
            collector.add(index, batch)
            advance()
    return collector.stats


class Collector:
    """One ONNX Runtime session over a copy of the model that outputs the observed tensors; `add` folds one
    calibration batch (by its index in the whole stream) into the statistics and row samples. A collector over
    any subset of the batches gives partial statistics that merge exactly (TensorStats.merge, RowSample.merge)."""

    def __init__(self, model: onnx.ModelProto, tensors: list[str], samples: dict[str, RowSample] | None = None,
                 threads: int = 0):
        self.samples = samples or {}
        names = sorted(set(tensors))
        self.stats = {name: TensorStats(name) for name in names}
        self.inputs = graph_inputs(model)
        self.from_feeds = [n for n in names if n in self.inputs]
        # ORT's graph rewrites keep every graph output, so the observed tensors survive them; fused kernels only
        # change float rounding, far below a histogram bin, and run calibration about twice as fast.
        self.session = runtime.session(with_outputs(model, [n for n in names if n not in self.inputs]),
                                       optimize=True, threads=threads)
        self.fetch = [o.name for o in self.session.get_outputs() if o.name in self.stats]

    def take(self) -> tuple[dict[str, TensorStats], dict[str, RowSample]]:
        """The statistics and samples so far; the collector starts afresh (same session) for the next shard."""
        taken = self.stats, self.samples
        self.stats = {name: TensorStats(name) for name in self.stats}
        self.samples = {name: RowSample(name, sample.capacity) for name, sample in self.samples.items()}
        return taken

    def add(self, index: int, batch: dict[str, np.ndarray]) -> None:
        feeds = checked_feeds(batch, self.inputs, index)
        try:
            values = self.session.run(self.fetch, feeds) if self.fetch else []  # run([]) would fetch every output
        except Exception as e:  # ORT raises its own exception types (Fail, InvalidArgument, ...)
            raise DataError(f"calibration batch {index}: ONNX Runtime failed: {str(e).strip()}") from e
        for name, value in zip(self.fetch + self.from_feeds, values + [feeds[n] for n in self.from_feeds]):
            if not np.issubdtype(value.dtype, np.floating):
                raise CalibrationError(f"calibration: tensor '{name}' has dtype {value.dtype}; only float "
                                       "activations can be calibrated")
            self.stats[name].update(value)
            if name in self.samples:
                self.samples[name].update(value, index)


@contextmanager
def progress_bar(description: str, total: int | None):
    """A rich progress bar on stderr; yields the function that advances it by one."""
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True)) as progress:
        task = progress.add_task(description, total=total)
        yield lambda: progress.advance(task)


def graph_inputs(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """The inputs that must be fed (initializers listed as inputs are weights, not data)."""
    weights = {t.name for t in model.graph.initializer}
    return {v.name: v for v in model.graph.input if v.name not in weights}


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of `model` whose graph outputs include `names` (which must be float, non-constant tensors)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    types = _elem_types(copy, names)
    produced = {out for node in copy.graph.node for out in node.output if out}
    weights = {t.name for t in copy.graph.initializer}
    existing = {o.name for o in copy.graph.output}
    for name in names:
        if name in weights:
            raise CalibrationError(f"calibration: tensor '{name}' is a constant (initializer), not an activation")
        if name not in produced:
            raise CalibrationError(f"calibration: tensor '{name}' is not produced by any node of the model")
        elem = types.get(name, onnx.TensorProto.FLOAT)
        if elem not in FLOAT_TYPES:
            raise CalibrationError(f"calibration: tensor '{name}' has type {onnx.TensorProto.DataType.Name(elem)}; "
                                   "only float activations can be calibrated")
        if name not in existing:
            copy.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
    return copy


def _elem_types(model: onnx.ModelProto, wanted: list[str]) -> dict[str, int]:
    """Element type of every tensor whose type is known; shapes are inferred only when the model does not
    already declare the types of the wanted tensors (trtglm's pipeline hands over shape-inferred models)."""
    types = _declared_types(model.graph)
    if any(name not in types for name in wanted) and model.ByteSize() < PROTO_LIMIT:
        try:
            types = _declared_types(onnx.shape_inference.infer_shapes(model).graph)
        except Exception:  # custom ops or partial models: keep the types the model already declares
            pass
    return types


def _declared_types(graph: onnx.GraphProto) -> dict[str, int]:
    types = {t.name: t.data_type for t in graph.initializer}
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
    return types


def checked_feeds(batch: dict[str, np.ndarray], inputs: dict[str, onnx.ValueInfoProto], index: int) -> dict:
    missing = [name for name in inputs if name not in batch]
    if missing:
        raise DataError(f"calibration batch {index}: missing input(s) {', '.join(map(repr, missing))}; "
                        f"the model expects {', '.join(map(repr, inputs))}")
    return {name: np.asarray(batch[name]) for name in inputs}


def head_absmax(model: onnx.ModelProto, names: list[str], batches: Iterable[dict[str, np.ndarray]]) -> dict:
    """Per-head absmax (over every axis but 1) of the named outputs ([batch, heads, seq, dim] KV-cache tensors)."""
    session = runtime.session(model, optimize=True)
    inputs = graph_inputs(model)
    found: dict[str, np.ndarray] = {}
    for index, batch in enumerate(batches):
        for name, value in zip(names, session.run(names, checked_feeds(batch, inputs, index))):
            if value.size:
                heads = np.abs(value).max(axis=(0, 2, 3)).astype(np.float64)
                found[name] = heads if name not in found else np.maximum(found[name], heads)
    missing = [n for n in names if n not in found]
    if missing:
        raise CalibrationError(f"--kv-cache int8: calibration never produced a non-empty '{missing[0]}'")
    return found
