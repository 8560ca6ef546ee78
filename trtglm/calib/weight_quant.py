"""The integer weights and corrected biases of the quantized layers: `--weight-rounding` and `--bias-correction`.

Why: insert_qdq rounds each weight to its nearest INT8 level and leaves the bias alone, which is right for most
layers of a transformer and wrong for the depthwise convolutions of a MobileNet/EfficientNet (see rounding.py).
This stage decides, once per build, the integer weights of every layer that may be quantized (AdaRound on the
layer's input statistics, or nearest) and the bias that cancels the layer's expected output shift, either from
calibration data (empirical: weight rounding and the input's own quantization, E[W_q Q(x)] - E[W x]) or from the
BatchNorm statistics of its input (analytic, data-free: the rounding part only; passes/normals.py). Each layer is treated on its own
FP32 inputs, so the decisions do not depend on which other layers the accuracy budget keeps in float; insert_qdq
applies them to the layers it quantizes.

What a layer's own statistics cannot see: quantization noise that passes through a nonlinearity becomes a mean
shift (E[relu6(z + n)] != E[relu6(z)]), and it accumulates with depth. `correct_sequentially` (--bias-correction
sequential, the empirical bias correction of Nagel et al. 2019) measures it where it is: layer by layer in graph
order, the mean output of the quantized model, with every earlier correction applied, against FP32's, on a few
calibration batches; each layer's bias absorbs what is left. One ONNX Runtime pass of the quantized model per
layer: minutes for a CNN of 65 layers on two cores, so it is opt-in.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnx import numpy_helper

from trtglm import runtime
from trtglm.calib import rounding
from trtglm.calib.collect import progress_bar, with_outputs
from trtglm.calib.layer_inputs import LinearLayer, collect_layer_inputs, linear_layer

SEQUENTIAL_SAMPLES = 32  # calibration samples the sequential correction measures on


@dataclass
class WeightDecisions:
    """Integer weights (weight name -> (int8 array in the weight's layout, per-channel scales)) and corrected biases
    (node name -> float32 bias) for insert_qdq; `layers` is the report, one row per layer."""

    weights: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    biases: dict[str, np.ndarray] = field(default_factory=dict)
    layers: list[dict] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self, rounding_method: str, correction: str) -> dict:
        near = sum(r["nearest_error"] for r in self.layers if "nearest_error" in r)
        chosen = sum(r["error"] for r in self.layers if "error" in r)
        return {"weight_rounding": rounding_method, "bias_correction": correction, "layers": len(self.layers),
                "rows_improved": sum(r.get("rows_improved", 0) for r in self.layers),
                "output_error_vs_nearest": round(chosen / near, 4) if near > 0 else None,
                "biases_corrected": len(self.biases), "seconds": self.seconds}


def decide_weights(graph: gs.Graph, model: onnx.ModelProto, nodes: list[str], batches: Iterable[dict] | None,
                   amax: dict[str, float], method: str, correction: str, qmax_of: dict[str, float],
                   input_means: dict, total: int | None = None, log: list[str] | None = None,
                   unsigned: frozenset[str] = frozenset()) -> WeightDecisions:
    """Decisions for the named nodes (Conv/Gemm/MatMul whose weight only they read). `model` is the FP32 model
    of `graph`, run on `batches` for the layer statistics (only when AdaRound or empirical correction needs them);
    `qmax_of` maps op types to their weight range (127, or 63 for 7-bit weights); the inputs named in `unsigned`
    are quantized on the unsigned grid."""
    log = log if log is not None else []
    by_name = {n.name: n for n in graph.nodes}
    layers = []
    for name in nodes:
        node = by_name[name]
        layer = linear_layer(node)
        if layer is None or len(node.inputs[1].outputs) != 1:
            log.append(f"weight_quant: '{name}' keeps nearest rounding: no constant weight of its own")
            continue
        layers.append(layer)
    decisions = WeightDecisions()
    stats = {}
    if method == "adaround" or correction in ("empirical", "sequential"):
        start = time.perf_counter()
        stats = collect_layer_inputs(model, layers, batches, amax, total, unsigned=unsigned)
        decisions.seconds["statistics"] = round(time.perf_counter() - start, 3)
    start = time.perf_counter()
    tensors = graph.tensors()
    with progress_bar(f"{method} rounding", len(layers)) as advance:
        for layer in layers:
            _decide(layer, by_name[layer.node], tensors, stats.get(layer.node), method, correction, qmax_of,
                    input_means, decisions, log)
            advance()
    decisions.seconds["rounding"] = round(time.perf_counter() - start, 3)
    return decisions


def _decide(layer: LinearLayer, node: gs.Node, tensors: dict, st, method: str, correction: str, qmax_of: dict,
            input_means: dict, decisions: WeightDecisions, log: list[str]) -> None:
    """The integer weights of one layer and, where its input means are known, its corrected bias."""
    w = np.asarray(tensors[layer.weight].values, dtype=np.float32)
    rows = layer.rows(w)
    hessian = st.hessian if st is not None else None
    r = rounding.round_layer(rows, hessian, qmax_of.get(layer.op, 127.0), method)
    row = {"node": layer.node}
    if hessian is not None:
        row.update(nearest_error=r.nearest_error, error=r.error, rows_improved=r.improved_rows)
    decisions.weights[layer.weight] = (layer.from_rows(r.q).astype(np.int8), r.scale.reshape(-1))
    means = _means(layer, st, correction, input_means)
    if means is not None:
        bias = _bias(node, layer)
        if bias is not None:
            shift = rounding.bias_shift(rows, r.q, r.scale, *means)
            decisions.biases[layer.node] = (bias - shift).astype(np.float32)
            row["bias_shift_rms"] = float(np.sqrt(np.mean(shift * shift)))
        else:
            log.append(f"weight_quant: '{layer.node}' bias not corrected: its bias is not a constant vector")
    elif correction == "analytic":
        log.append(f"weight_quant: '{layer.node}' bias not corrected: its input's statistics are not known "
                   "from a BatchNorm")
    decisions.layers.append(row)


def correct_sequentially(fp32: onnx.ModelProto, quantized: onnx.ModelProto, nodes: list[str], feeds: list[dict],
                         biases: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The biases of the quantized `nodes` (in graph order) after sequential correction; `quantized` is the Q/DQ
    model with `biases` applied, `feeds` the calibration batches to measure on. Both models run literally (Q/DQ as
    float math, as TensorRT computes)."""
    q = onnx.ModelProto()
    q.CopyFrom(quantized)
    by_name = {n.name: n for n in q.graph.node}
    inits = {t.name: t for t in q.graph.initializer}
    targets = [by_name[n] for n in nodes if n in by_name and len(by_name[n].input) > 2
               and by_name[n].input[2] in inits]
    outputs = [n.output[0] for n in targets]
    reference = _channel_means(fp32, outputs, feeds)
    given = _biases(fp32, [n.name for n in targets]) | biases  # what insert_qdq starts from
    corrected = dict(biases)
    with progress_bar("sequential bias correction", len(targets)) as advance:
        for node, out in zip(targets, outputs):
            got = _channel_means(q, [out], feeds)[out]
            tensor = inits[node.input[2]]
            bias = numpy_helper.to_array(tensor)  # may hold more than `given`: an unsigned input's shift
            if got.size == bias.size:
                shift = got - reference[out]
                new = (bias.reshape(-1).astype(np.float64) - shift).astype(bias.dtype)
                tensor.CopyFrom(numpy_helper.from_array(new.reshape(bias.shape), tensor.name))
                start = given.get(node.name, np.zeros(got.size))
                corrected[node.name] = (np.asarray(start, np.float64).reshape(-1) - shift).astype(np.float32)
            advance()
    return corrected


def _biases(model: onnx.ModelProto, nodes: list[str]) -> dict[str, np.ndarray]:
    """The constant bias (input 2) of each named node that has one."""
    inits = {t.name: t for t in model.graph.initializer}
    wanted = set(nodes)
    return {n.name: numpy_helper.to_array(inits[n.input[2]]).reshape(-1) for n in model.graph.node
            if n.name in wanted and len(n.input) > 2 and n.input[2] in inits}


def _channel_means(model: onnx.ModelProto, names: list[str], feeds: list[dict]) -> dict[str, np.ndarray]:
    """Per channel (axis 1) mean of each named tensor over the feeds."""
    session = runtime.session(with_outputs(model, names), optimize=False)
    inputs = [i.name for i in session.get_inputs()]
    sums: dict[str, np.ndarray] = {}
    count = 0
    for feed in feeds:
        values = session.run(names, {k: feed[k] for k in inputs})
        count += values[0].shape[0]
        for name, v in zip(names, values):
            axes = tuple(i for i in range(v.ndim) if i != 1)
            part = v.astype(np.float64).sum(axis=axes) / (v.size / (v.shape[0] * v.shape[1]))
            sums[name] = sums.get(name, 0.0) + part
    return {name: total / max(count, 1) for name, total in sums.items()}


def _means(layer: LinearLayer, st, correction: str, input_means: dict):
    """(FP32 input mean, quantized input mean) per input row element, or None."""
    if correction in ("empirical", "sequential") and st is not None:
        return st.mean, st.quantized_mean
    if correction != "analytic":
        return None
    channel_mean = input_means.get(layer.input)
    if channel_mean is None:
        return None
    if layer.op == "Conv":
        taps = int(np.prod(layer.kernel))
        per_row = np.repeat(channel_mean, taps).reshape(layer.groups, -1)
    else:
        per_row = channel_mean.reshape(1, -1)
    return per_row, per_row


def _bias(node: gs.Node, layer: LinearLayer) -> np.ndarray | None:
    """The layer's bias per output channel (zeros for a Conv without one), or None when it has none we can set."""
    channels = layer.weight_shape[layer.channel_axis]
    if node.op == "Conv":
        if len(node.inputs) < 3 or node.inputs[2].is_empty():
            return np.zeros(channels, np.float32)
        b = node.inputs[2]
        return np.asarray(b.values, np.float32).reshape(-1) if isinstance(b, gs.Constant) else None
    if node.op == "Gemm" and len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant) \
            and float(node.attrs.get("alpha", 1.0)) == 1.0 and float(node.attrs.get("beta", 1.0)) == 1.0:
        c = np.asarray(node.inputs[2].values, np.float32)
        return c.reshape(-1) if c.size == channels else None
    return None
