"""Per-tensor choices by the error they cause: SmoothQuant strength (`--smoothquant auto`) and calibration method
(`--calib-method auto`).

Why: one setting does not fit every tensor of a transformer. Entropy calibration clips the few outlier channels of
a LayerNorm output, and those channels matter to the next GEMM; minmax keeps them and leaves the other channels a
handful of INT8 levels; SmoothQuant's alpha trades activation range against weight range, and the best trade
differs between a LayerNorm output (a few huge channels) and a GELU output (heavy tails everywhere). So each
activation that feeds linear layers with constant weights is judged by what matters: the relative error of those
layers' outputs, X @ W against fake-quantized (X/s) @ fake-quantized(s W), on a sample of the activation's real
rows (RowSample) kept during calibration. Weights are fake-quantized per output channel as insert_qdq does.
A tensor read only by convolutions has no sampled rows; its method minimizes the tensor's own quantization error
(mse): a dense convolution spreads input errors over many products, so its output error follows the input's,
while entropy calibration clips, among others, the saturated values of a ReLU6 output (measured on
EfficientNet-Lite: a 1152-channel ReLU6 output clipped from 6 to 4, 21 dB SQNR, a quarter of the model's INT8
error). Other tensors (residual Adds) keep the default method.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from trtglm.calib.methods import METHODS, amax_from_stats
from trtglm.calib.stats import TensorStats

ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # candidates besides no smoothing at all
DEFAULT_METHOD = "entropy"  # for tensors without linear consumers (TensorRT's own default)
CONV_METHOD = "mse"  # for tensors read only by convolutions


@dataclass(frozen=True)
class Choice:
    value: object  # the chosen alpha (None: no smoothing) or method name
    errors: dict  # candidate -> relative output error, for the report


def linear_weights(graph: gs.Graph, name: str, keep_float: frozenset[str] = frozenset()) -> list[np.ndarray]:
    """The (K, N) weights of the MatMul/Gemm nodes that read tensor `name` as their data input (A)."""
    tensor = graph.tensors().get(name)
    if tensor is None:
        return []
    weights = []
    for node in tensor.outputs:
        if node.name in keep_float or len(node.inputs) < 2 or node.inputs[0] is not tensor:
            continue
        w = node.inputs[1]
        if not isinstance(w, gs.Constant) or w.values.ndim != 2 or w.values.dtype not in (np.float32, np.float16):
            continue
        if node.op == "MatMul":
            weights.append(np.asarray(w.values, dtype=np.float32))
        elif node.op == "Gemm" and not int(node.attrs.get("transA", 0)):
            values = np.asarray(w.values, dtype=np.float32)
            weights.append(values.T if int(node.attrs.get("transB", 0)) else values)
    return [w for w in weights if tensor.shape is None or tensor.shape[-1] in (w.shape[0], None)
            or not isinstance(tensor.shape[-1], (int, np.integer))]


def fake_quant(x: np.ndarray, amax, qmax: float = 127.0) -> np.ndarray:
    scale = np.maximum(np.asarray(amax, dtype=np.float32), 1e-12) / np.float32(qmax)
    return np.clip(np.rint(x / scale), -qmax, qmax) * scale


def fake_quant_weight(w: np.ndarray) -> np.ndarray:
    """Per output channel (the N axis of a (K, N) weight), symmetric int8."""
    amax = np.abs(w).max(axis=0)
    return fake_quant(w, np.where(amax > 0, amax, 1.0))


def output_error(rows: np.ndarray, weights: list[np.ndarray], amax: float, scale: np.ndarray | None = None) -> float:
    """Mean over rows (tokens) of ||x W - Q(x/s) Q(s W)||^2 / ||x W||^2, W the consumers' weights side by side.

    Per row, not over the whole matrix: a few outlier tokens have outputs 100x the others, and a Frobenius norm
    would judge a choice by them alone, while the LayerNorm after the residual Add normalizes every token.
    """
    w = np.concatenate(weights, axis=1)
    x, ws = (rows, w) if scale is None else (rows / scale, w * scale[:, None])
    return _relative(rows @ w, fake_quant(x, amax) @ fake_quant_weight(ws))


def _relative(ref: np.ndarray, got: np.ndarray) -> float:
    ref_norm = np.square(ref, dtype=np.float64).sum(axis=1)
    floor = 1e-6 * float(ref_norm.mean()) + 1e-30  # rows with (almost) no output do not divide by zero
    return float(np.mean(np.square(ref - got, dtype=np.float64).sum(axis=1) / (ref_norm + floor)))


def smoothing_factors(channel_absmax: np.ndarray, weights: list[np.ndarray], alpha: float) -> np.ndarray:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha) over every consumer's weight row j, clipped to [1e-5, 1e5]."""
    weight_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0).astype(np.float64)
    s = np.maximum(channel_absmax, 1e-8) ** alpha / np.maximum(weight_max, 1e-8) ** (1.0 - alpha)
    return np.clip(s, 1e-5, 1e5)


def choose_alpha(stats: TensorStats, rows: np.ndarray, weights: list[np.ndarray], method: str,
                 percentile: float = 99.99) -> Choice:
    """The SmoothQuant alpha (or None) whose smoothed activation, calibrated with `method` (with "auto": the best
    method for that alpha), errs least."""
    w = np.concatenate(weights, axis=1)
    ref = rows @ w
    methods = METHODS if method == "auto" else (method,)
    errors: dict = {}
    for alpha in (None, *ALPHAS):
        if alpha is None:
            x, wq, bound = rows, fake_quant_weight(w), stats.absmax
        else:
            scale = smoothing_factors(stats.channel_absmax, weights, alpha).astype(np.float32)
            x, wq = rows / scale, fake_quant_weight(w * scale[:, None])
            bound = float(np.max(stats.channel_absmax / scale))  # exact absmax of the smoothed tensor
        sample = TensorStats("sample")
        sample.update(x)
        errors[alpha] = min(_relative(ref, fake_quant(x, _amax(sample, bound, m, percentile)) @ wq) for m in methods)
    best = min(errors, key=lambda a: (errors[a], -1.0 if a is None else a))  # ties: no smoothing, then small
    return Choice(best, errors)


def choose_method(stats: TensorStats, rows: np.ndarray, weights: list[np.ndarray], percentile: float = 99.99) -> Choice:
    """The calibration method whose amax (from the full statistics) errs least on the sampled rows."""
    errors = {m: output_error(rows, weights, amax_from_stats(stats, m, percentile)) for m in METHODS}
    return Choice(min(sorted(errors), key=errors.get), errors)


def _amax(sample: TensorStats, absmax: float, method: str, percentile: float) -> float:
    """The threshold `method` picks on the sampled rows; minmax uses the exact absmax of all the data."""
    return absmax if method == "minmax" else min(amax_from_stats(sample, method, percentile), absmax)



def alphas_for(graph: gs.Graph, stats: dict[str, TensorStats], samples: dict, setting, method: str,
               percentile: float, pinned: dict[str, float | None], keep_float: frozenset[str]) -> dict[str, Choice]:
    """SmoothQuant alpha per activation that feeds MatMuls with constant weights. `setting`: a float (that alpha
    everywhere), "off", or None (auto: searched per tensor); `pinned` (from --quant-config) wins over both."""
    choices: dict[str, Choice] = {}
    for name in sorted(stats):
        weights = smoothable_weights(graph, name, keep_float)
        if not weights or stats[name].channel_absmax is None:
            continue
        if name in pinned:
            choices[name] = Choice(pinned[name], {})
        elif setting is None and samples.get(name) is not None and samples[name].rows is not None:
            choices[name] = choose_alpha(stats[name], samples[name].rows, weights, method, percentile)
        elif isinstance(setting, float):
            choices[name] = Choice(setting, {})
    return choices


def methods_for(graph: gs.Graph, stats: dict[str, TensorStats], samples: dict, method: str, percentile: float,
                pinned: dict[str, str], keep_float: frozenset[str]) -> dict[str, Choice]:
    """Calibration method per activation: `method`, or with "auto" the one that errs least in the linear layers
    that read the tensor (DEFAULT_METHOD for tensors read by no linear layer); `pinned` wins."""
    choices: dict[str, Choice] = {}
    tensors = graph.tensors()
    for name in sorted(stats):
        if name in pinned:
            choices[name] = Choice(pinned[name], {})
            continue
        weights = linear_weights(graph, name, keep_float) if method == "auto" else []
        rows = samples[name].rows if name in samples else None
        if weights and rows is not None:
            choices[name] = choose_method(stats[name], rows, weights, percentile)
        elif method == "auto" and _read_by_convolutions(tensors.get(name), keep_float):
            choices[name] = Choice(CONV_METHOD, {})
        else:
            choices[name] = Choice(DEFAULT_METHOD if method == "auto" else method, {})
    return choices


def _read_by_convolutions(tensor: gs.Tensor | None, keep_float: frozenset[str]) -> bool:
    readers = [n for n in tensor.outputs if n.name not in keep_float] if tensor is not None else []
    return bool(readers) and all(n.op in ("Conv", "ConvTranspose") and n.inputs[0] is tensor for n in readers)


def smoothable_weights(graph: gs.Graph, name: str, keep_float: frozenset[str] = frozenset()) -> list[np.ndarray]:
    """The (K, N) weights of the MatMuls that SmoothQuant can rescale for tensor `name` (see passes/smooth_quant)."""
    tensor = graph.tensors().get(name)
    if tensor is None:
        return []
    return [np.asarray(n.inputs[1].values, dtype=np.float32) for n in tensor.outputs
            if n.op == "MatMul" and n.name not in keep_float and n.inputs[0] is tensor
            and isinstance(n.inputs[1], gs.Constant) and n.inputs[1].values.ndim == 2
            and n.inputs[1].values.dtype in (np.float32, np.float16)
            and (tensor.shape is None or not isinstance(tensor.shape[-1], (int, np.integer))
                 or tensor.shape[-1] == n.inputs[1].values.shape[0])]


def wants_rows(graph: gs.Graph, names: list[str], keep_float: frozenset[str]) -> list[str]:
    """The activations a search needs row samples of: those read by linear layers."""
    return [n for n in names if linear_weights(graph, n, keep_float)]
