"""Per-channel expected values of activations from the BatchNorm statistics the passes record (PassContext.normals):
what analytic (data-free) bias correction knows of a layer's input.

A BatchNorm output is N(beta, gamma^2) per channel when its running statistics match the data it sees; ReLU, Clip
(ReLU6) and equalize's Relu + per-channel Min of one are clipped normals with a closed-form mean; zero padding and
Identity pass the mean through (padding's zeros are ignored); an Add adds its inputs' means.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from trtglm.passes.match import clip_bounds


def input_means(graph: gs.Graph, names: list[str], normals: dict) -> dict[str, np.ndarray]:
    """Per-channel E[tensor] of each named tensor whose mean follows from `normals`."""
    tensors = graph.tensors()
    found = {name: expected_value(tensors[name], normals) for name in names if name in tensors}
    return {name: mean for name, mean in found.items() if mean is not None}


def expected_value(tensor: gs.Tensor, normals: dict, depth: int = 0) -> np.ndarray | None:
    """Per-channel E[tensor] from BatchNorm statistics: a BatchNorm output is N(beta, gamma^2) per channel; ReLU
    and Clip of one are clipped normals; zero padding and Identity pass the mean through; an Add adds means."""
    if depth > 8:
        return None
    if tensor.name in normals:
        return np.asarray(normals[tensor.name][0], dtype=np.float64)
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is None:
        return None
    source = producer.inputs[0] if producer.inputs else None
    if producer.op in ("Pad", "Identity") and isinstance(source, gs.Variable):
        mode = producer.attrs.get("mode", "constant")
        if producer.op == "Identity" or mode == "constant":
            return expected_value(source, normals, depth + 1)
        return None
    if producer.op in ("Relu", "Clip") and isinstance(source, gs.Variable) and source.name in normals:
        low, high = (0.0, math.inf) if producer.op == "Relu" else clip_bounds(producer)
        if low is None or high is None:
            return None
        mean, std = normals[source.name]
        return _clipped_normal_mean(np.asarray(mean, np.float64), np.asarray(std, np.float64), low, high)
    if producer.op == "Min" and len(producer.inputs) == 2 and isinstance(producer.inputs[1], gs.Constant) \
            and source is not None and source.inputs and source.inputs[0].op == "Relu":
        pre = source.inputs[0].inputs[0]  # Min(Relu(z), per-channel bound): equalize's rescaled ReLU6
        if pre.name in normals:
            mean, std = normals[pre.name]
            high = np.asarray(producer.inputs[1].values, np.float64).reshape(-1)
            return _clipped_normal_mean(np.asarray(mean, np.float64), np.asarray(std, np.float64), 0.0, high)
    if producer.op == "Add" and all(isinstance(t, gs.Variable) for t in producer.inputs):
        parts = [expected_value(t, normals, depth + 1) for t in producer.inputs]
        if all(p is not None for p in parts) and parts[0].shape == parts[1].shape:
            return parts[0] + parts[1]
    return None


def _clipped_normal_mean(mean: np.ndarray, std: np.ndarray, low: float, high) -> np.ndarray:
    """E[clip(z, low, high)] for z ~ N(mean, std^2), per channel (std 0: clip(mean)); `high` a scalar or one bound
    per channel."""
    high = np.broadcast_to(np.asarray(high, np.float64), mean.shape)
    out = np.clip(mean, low, high)
    live = std > 0
    m, s, high = mean[live], std[live], high[live]
    a, b = (low - m) / s, (high - m) / s
    cdf = np.vectorize(lambda t: 0.5 * (1.0 + math.erf(t / math.sqrt(2.0))))
    pdf = lambda t: np.exp(-0.5 * np.minimum(t * t, 1e4)) / math.sqrt(2.0 * math.pi)  # noqa: E731
    fa, fb = cdf(a), cdf(b)
    value = m * (fb - fa) + s * (pdf(a) - pdf(b))
    if np.isfinite(low):
        value += low * fa
    value += np.where(np.isfinite(high), high, 0.0) * (1.0 - fb)
    out[live] = value
    return out
