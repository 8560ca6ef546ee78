"""Sensitivity analysis and automatic mixed precision (`--accuracy-budget`).

Why: INT8 error is not spread evenly. In a transformer a few linear layers (those reading LayerNorm outputs with
outlier channels, the FFN down-projections reading GELU tails) cause most of the loss, and keeping just those in
float recovers most of the accuracy at a small cost in speed. Which ones depends on the weights, so it is measured:
each quantizable layer is quantized alone, everything else float, and its effect on the model's *final* outputs
is recorded (1 - mean cosine against FP32 over the analysis samples). Then layers are kept in float, most sensitive
first, until the fully quantized rest meets the budget; the smallest such set is found by bisection over that
order, one model build per step.

The analysis runs on calibration samples, never on the evaluation data the build reports: the reported accuracy is
measured on data the decision did not see. FP32 outputs are computed once and reused; each candidate model runs in
ONNX Runtime with graph optimizations off, so Q/DQ are computed literally, as TensorRT computes them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from trtglm import runtime
from trtglm.verify import sample_cosines


@dataclass
class Layer:
    node: str
    op: str
    macs: int  # multiply-accumulates per sample (dynamic axes counted as 1)
    error: float | None = None  # model output error with only this layer in INT8
    precision: str = "int8"


@dataclass
class Sensitivity:
    budget: float
    samples: int
    error: float  # output error of the chosen mix on the analysis samples
    full_int8_error: float
    layers: list[Layer] = field(default_factory=list)

    @property
    def keep_float(self) -> frozenset[str]:
        return frozenset(layer.node for layer in self.layers if layer.precision == "float")


def linear_layers(graph: gs.Graph, names: list[str]) -> list[Layer]:
    """The named nodes with a constant weight (linear layers), with their MACs, in graph order."""
    wanted = set(names)
    layers = []
    for node in graph.nodes:
        if node.name in wanted:
            weight = next((t for t in node.inputs[1:2] if isinstance(t, gs.Constant)), None)
            if weight is not None:
                layers.append(Layer(node.name, node.op, _macs(node, weight)))
    return layers


def int8_mac_fraction(layers: list[Layer]) -> float:
    total = sum(layer.macs for layer in layers)
    return sum(layer.macs for layer in layers if layer.precision == "int8") / total if total else 1.0


def analyse(fp32: onnx.ModelProto, layers: list[Layer], quantize: Callable[[frozenset[str]], onnx.ModelProto],
            feeds: list[dict[str, np.ndarray]], budget: float, mapper: Callable | None = None) -> Sensitivity:
    """Fill each layer's `error` and `precision`; `quantize(keep_float)` builds the INT8 model with those layers
    kept in float. `mapper(fn, items, description)` evaluates the per-layer errors, one independent evaluation per
    layer (trtglm.calib.ray_executor.ray_map runs them as Ray tasks); default: here, in order."""
    reference = _run(runtime.session(fp32, optimize=False), feeds)
    everything = frozenset(layer.node for layer in layers)
    keeps = [everything - {layer.node} for layer in layers]
    for layer, error in zip(layers, (mapper or _local_map)(_LayerError(quantize, feeds, reference), keeps,
                                                            "sensitivity")):
        layer.error = error
    order = sorted(layers, key=lambda layer: (-(layer.error or 0.0), layer.node))
    full = _error(quantize(frozenset()), feeds, reference)
    errors = {0: full}
    lo, hi = 0, len(order)  # errors[hi] is 0 by construction (all float); find the smallest k within budget
    if full > budget:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            errors[mid] = _error(quantize(frozenset(layer.node for layer in order[:mid])), feeds, reference)
            lo, hi = (lo, mid) if errors[mid] <= budget else (mid, hi)
        k = hi
    else:
        k = 0
    for layer in order[:k]:
        layer.precision = "float"
    return Sensitivity(budget=budget, samples=sum(len(next(iter(f.values()))) for f in feeds),
                       error=errors.get(k, 0.0), full_int8_error=full, layers=layers)


class _LayerError:
    """The error of the model quantized with `keep` in float (a picklable callable, for Ray tasks)."""

    def __init__(self, quantize, feeds, reference):
        self.quantize, self.feeds, self.reference = quantize, feeds, reference

    def __call__(self, keep: frozenset[str]) -> float:
        return _error(self.quantize(keep), self.feeds, self.reference)


def _local_map(fn, items: list, description: str) -> list:
    out = []
    with _progress() as progress:
        task = progress.add_task(description, total=len(items))
        for item in items:
            out.append(fn(item))
            progress.advance(task)
    return out


def _error(model: onnx.ModelProto, feeds, reference) -> float:
    """1 - mean cosine over samples (each output weighs the same)."""
    outputs = _run(runtime.session(model, optimize=False), feeds)
    cosines = [sample_cosines(ref, out) for ref, out in zip(reference, outputs)]
    return float(1.0 - np.mean(cosines))


def _run(session, feeds) -> list[np.ndarray]:
    """Every float output, batches concatenated along the first axis."""
    names = [o.name for o in session.get_outputs()]
    runs = [session.run(names, feed) for feed in feeds]
    return [np.concatenate([r[i] for r in runs]) for i in range(len(names))
            if np.issubdtype(runs[0][i].dtype, np.floating)]


def _macs(node: gs.Node, weight: gs.Constant) -> int:
    out = node.outputs[0].shape or []
    static = [int(d) for d in out[1:] if isinstance(d, (int, np.integer)) and d > 0]
    w = weight.values
    if node.op in ("Conv", "ConvTranspose"):
        spatial = np.prod(static[1:]) if node.op == "Conv" else np.prod(_spatial(node.inputs[0]))
        return int(w.size * spatial)
    rows = int(np.prod(static[:-1])) if len(static) == len(out) - 1 else 1  # tokens per sample when known
    return int(w.size * rows)


def _spatial(tensor: gs.Tensor) -> list[int]:
    shape = tensor.shape or []
    return [int(d) for d in shape[2:] if isinstance(d, (int, np.integer)) and d > 0]


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True))
