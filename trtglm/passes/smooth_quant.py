"""SmoothQuant: move activation outliers into the weights of the MatMuls they feed (Xiao et al., 2023).

Why: transformer activations that feed linear layers (LayerNorm and GELU outputs) have a few channels whose
|x| is 10-100x the rest, so one per-tensor INT8 scale either clips them or leaves the other channels a handful of
levels. X @ W == (X / s) @ (diag(s) W) for any per-channel s > 0: with s_j = max|X_j|^alpha / max|W_j|^(1-alpha)
the activation's channels are flattened and the weights (quantized per output channel, so they absorb it well)
take the difference. Only MatMuls with a constant 2-D weight (K, N) whose activation's last axis is K are smoothed.

Where the division goes: when the tensor is the output of a LayerNormalization or RMSNormalization with constant
scale (and bias) and only smoothed MatMuls read it (pre-norm decoders: GLM, Llama), 1/s is folded into the
normalization's scale and bias, so the graph gains no node. Otherwise (BERT's post-norm outputs also feed the
residual Add; GELU outputs) it is a per-channel Mul in front of the MatMuls, which TensorRT fuses into the
producing kernel's epilogue, and the other consumers keep reading the unsmoothed tensor. Either way the layers
then read a tensor named `<name>_smoothed`.

Unlike the other passes it needs calibration statistics (per-channel absmax), so the pipeline runs it between
a first calibration pass and the calibration of the smoothed activations.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from trtglm.calib.search import smoothing_factors
from trtglm.calib.stats import TensorStats


def smooth_quant(graph: gs.Graph, stats: dict[str, TensorStats], alpha: float | dict[str, float],
                 keep_float: frozenset[str] = frozenset()) -> int:
    """Smooth observed activations feeding MatMuls with constant weights: every one with a float `alpha`, or
    those named in a dict {tensor name: alpha}. Returns how many tensors were smoothed."""
    tensors = graph.tensors()
    count = 0
    for name in sorted(stats):
        strength = alpha.get(name) if isinstance(alpha, dict) else alpha
        channels = stats[name].channel_absmax
        tensor = tensors.get(name)
        if strength is None or channels is None or tensor is None:
            continue
        matmuls = [n for n in tensor.outputs if _smoothable(n, tensor, channels.size) and n.name not in keep_float]
        if not matmuls:
            continue
        s = smoothing_factors(channels, [n.inputs[1].values for n in matmuls], strength)
        smoothed = gs.Variable(f"{name}_smoothed", dtype=tensor.dtype, shape=tensor.shape)
        if not _fold_into_norm(graph, tensor, smoothed, matmuls, s):
            inv = gs.Constant(f"{name}_smooth_inv_scale", (1.0 / s).astype(np.float32))
            graph.nodes.append(gs.Node("Mul", f"{name}_SmoothQuant", inputs=[tensor, inv], outputs=[smoothed]))
        for node in matmuls:
            weight = node.inputs[1]
            scaled = (weight.values.astype(np.float64) * s[:, None]).astype(weight.values.dtype)
            node.inputs[1] = gs.Constant(f"{node.name}_smoothed_weight", scaled)  # a copy: weights may be shared
            node.inputs[0] = smoothed
        count += 1
    graph.cleanup().toposort()
    return count


def _fold_into_norm(graph: gs.Graph, tensor: gs.Variable, smoothed: gs.Variable, matmuls: list[gs.Node],
                    s: np.ndarray) -> bool:
    """Divide a normalization's scale (and bias) by s and make it write `smoothed`; False when it cannot."""
    norm = tensor.inputs[0] if len(tensor.inputs) == 1 else None
    if (norm is None or norm.op not in ("LayerNormalization", "RMSNormalization") or tensor in graph.outputs
            or len(norm.outputs) != 1 or {id(n) for n in tensor.outputs} != {id(n) for n in matmuls}):
        return False
    params = norm.inputs[1:3]
    if not all(isinstance(p, gs.Constant) for p in params) or any(p.values.shape[-1:] != s.shape for p in params):
        return False
    for i, param in enumerate(params, start=1):  # copies: parameters may be shared
        values = (param.values.astype(np.float64) / s).astype(param.values.dtype)
        norm.inputs[i] = gs.Constant(f"{param.name}_smoothed", values)
    norm.outputs[0] = smoothed
    return True


def _smoothable(node: gs.Node, tensor: gs.Tensor, channels: int) -> bool:
    if node.op != "MatMul" or node.inputs[0] is not tensor or not isinstance(node.inputs[1], gs.Constant):
        return False
    weight = node.inputs[1].values
    return weight.ndim == 2 and weight.shape[0] == channels and weight.dtype in (np.float32, np.float16)
