"""Fold inference-mode BatchNormalization into the preceding Conv, ConvTranspose or Gemm; lower the rest to Mul+Add.

Why: TensorRT quantizes a Conv's *weights* per output channel, so the BN scale must be inside those weights
before calibration and Q/DQ insertion; a BN left after the Conv would sit between the Conv and its activation,
breaking the Conv+bias+activation fusion and costing an extra INT8 re-quantization. A BN that has no foldable
producer (after a graph input, after a Relu, or behind a Conv whose output has other consumers) becomes Mul+Add
with constant per-channel tensors: TensorRT fuses those as a Scale layer, and no BatchNormalization remains for
insert_qdq to treat specially.

For y = gamma * (x - mean) / sqrt(var + eps) + beta, with s = gamma / sqrt(var + eps):
  Conv           W[o, ...] *= s[o];                    b = (b - mean) * s + beta
  ConvTranspose  W[g * Ci/G + i, j, ...] *= s[g * Co/G + j]  (weights are (C_in, C_out/group, k...))
  Gemm           column f of alpha*op(B) scaled by s[f]; C = beta_gemm * C * s + (beta - mean * s); alpha = beta = 1
The arithmetic is float64, cast back to the weights' dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from trtglm.passes.fold_constants import annotate_shapes
from trtglm.passes.naming import tensor_name

if TYPE_CHECKING:
    from trtglm.passes import PassContext

FOLDABLE_PRODUCERS = ("Conv", "ConvTranspose", "Gemm")


def fold_batchnorm(graph: gs.Graph, ctx: PassContext) -> int:
    graph.toposort()
    rewrites = 0
    for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
        params = _bn_scale_shift(bn, graph, ctx)
        if params is None:
            continue
        scale, shift = params
        gamma, beta = (np.asarray(t.values, dtype=np.float64).reshape(-1) for t in bn.inputs[1:3])
        ctx.normals[bn.outputs[0].name] = (beta, np.abs(gamma))
        producer = _foldable_producer(bn, graph)
        if producer is not None and _FOLDERS[producer.op](producer, scale, shift, graph):
            producer.outputs[0] = bn.outputs[0]
            ctx.log.append(f"fold_batchnorm: {bn.name} folded into {producer.op} {producer.name}")
        elif not _to_mul_add(bn, scale, shift, graph, ctx):
            continue
        bn.inputs.clear()
        bn.outputs.clear()
        rewrites += 1
    graph.cleanup().toposort()
    return rewrites


def _bn_scale_shift(bn: gs.Node, graph: gs.Graph, ctx: PassContext):
    """(s, t) in float64 with y = x * s + t per channel, or None when the BN cannot be rewritten."""
    if bn.attrs.get("training_mode", 0):
        ctx.log.append(f"fold_batchnorm: {bn.name} kept: training_mode=1")
        return None
    outputs = {t.name for t in graph.outputs}
    for extra in bn.outputs[1:]:  # running mean/var outputs exist only in training mode
        if not extra.is_empty() and (extra.outputs or extra.name in outputs):
            ctx.log.append(f"fold_batchnorm: {bn.name} kept: its running statistics are used")
            return None
    params = bn.inputs[1:5]
    if len(params) != 4 or not all(isinstance(p, gs.Constant) for p in params):
        ctx.log.append(f"fold_batchnorm: {bn.name} kept: scale/bias/mean/var are not all constants")
        return None
    gamma, beta, mean, var = (np.asarray(p.values, dtype=np.float64).reshape(-1) for p in params)
    eps = float(np.float32(bn.attrs.get("epsilon", 1e-5)))
    scale = gamma / np.sqrt(var + eps)
    return scale, beta - mean * scale


def _foldable_producer(bn: gs.Node, graph: gs.Graph) -> gs.Node | None:
    x = bn.inputs[0]
    if len(x.inputs) != 1 or len(x.outputs) != 1 or x in graph.outputs:
        return None
    producer = x.inputs[0]
    if producer.op not in FOLDABLE_PRODUCERS or len(producer.outputs) != 1:
        return None
    return producer


def _fold_conv(conv: gs.Node, scale: np.ndarray, shift: np.ndarray, graph: gs.Graph) -> bool:
    weight = conv.inputs[1] if len(conv.inputs) > 1 else None
    if not isinstance(weight, gs.Constant) or weight.values.shape[0] != scale.size:
        return False
    w = np.asarray(weight.values)
    bias = _bias(conv, 2, scale.size)
    if bias is None:
        return False
    new_w = w.astype(np.float64) * scale.reshape((-1,) + (1,) * (w.ndim - 1))
    _set_constant(conv, 1, new_w.astype(w.dtype), graph)
    _set_constant(conv, 2, (bias * scale + shift).astype(w.dtype), graph, suffix="_bias")
    return True


def _fold_conv_transpose(conv: gs.Node, scale: np.ndarray, shift: np.ndarray, graph: gs.Graph) -> bool:
    weight = conv.inputs[1] if len(conv.inputs) > 1 else None
    if not isinstance(weight, gs.Constant):
        return False
    w = np.asarray(weight.values)
    group = int(conv.attrs.get("group", 1))
    c_in, c_out_per_group = w.shape[0], w.shape[1]
    if c_in % group or c_out_per_group * group != scale.size:
        return False
    bias = _bias(conv, 2, scale.size)
    if bias is None:
        return False
    grouped = w.astype(np.float64).reshape((group, c_in // group, c_out_per_group) + w.shape[2:])
    grouped = grouped * scale.reshape((group, 1, c_out_per_group) + (1,) * (w.ndim - 2))
    _set_constant(conv, 1, grouped.reshape(w.shape).astype(w.dtype), graph)
    _set_constant(conv, 2, (bias * scale + shift).astype(w.dtype), graph, suffix="_bias")
    return True


def _fold_gemm(gemm: gs.Node, scale: np.ndarray, shift: np.ndarray, graph: gs.Graph) -> bool:
    weight = gemm.inputs[1]
    if not isinstance(weight, gs.Constant) or np.asarray(weight.values).ndim != 2:
        return False
    w = np.asarray(weight.values)
    trans_b = int(gemm.attrs.get("transB", 0))
    features = w.shape[0] if trans_b else w.shape[1]
    if features != scale.size:
        return False
    alpha = float(gemm.attrs.get("alpha", 1.0))
    beta = float(gemm.attrs.get("beta", 1.0))
    if len(gemm.inputs) > 2 and not gemm.inputs[2].is_empty():
        c = gemm.inputs[2]
        if not isinstance(c, gs.Constant):
            return False
        c = np.asarray(c.values, dtype=np.float64)
    else:
        c = np.zeros(scale.size)
    new_w = w.astype(np.float64) * alpha * (scale[:, None] if trans_b else scale[None, :])
    new_c = beta * c * scale + shift  # broadcasts like C did: scalar, (F,), (1, F), (M, 1) or (M, F)
    _set_constant(gemm, 1, new_w.astype(w.dtype), graph)
    _set_constant(gemm, 2, new_c.astype(w.dtype), graph, suffix="_bias")
    gemm.attrs["alpha"] = 1.0
    gemm.attrs["beta"] = 1.0
    return True


_FOLDERS = {"Conv": _fold_conv, "ConvTranspose": _fold_conv_transpose, "Gemm": _fold_gemm}


def _bias(node: gs.Node, index: int, channels: int) -> np.ndarray | None:
    """The node's constant bias in float64 (zeros when absent), or None when it is not a constant."""
    if len(node.inputs) <= index or node.inputs[index].is_empty():
        return np.zeros(channels)
    bias = node.inputs[index]
    if not isinstance(bias, gs.Constant) or bias.values.size != channels:
        return None
    return np.asarray(bias.values, dtype=np.float64).reshape(-1)


def _set_constant(node: gs.Node, index: int, values: np.ndarray, graph: gs.Graph, suffix: str = "") -> None:
    """Put `values` at input `index`: in place if the node is the constant's only user, else as a new constant."""
    old = node.inputs[index] if len(node.inputs) > index else None
    if isinstance(old, gs.Constant) and len(old.outputs) == 1 and old not in graph.outputs:
        old.values = values
        return
    base = old.name if old is not None and not old.is_empty() else (node.name or node.op) + suffix
    tensor = gs.Constant(tensor_name(graph, base + "_bnfold"), values)
    while len(node.inputs) <= index:
        node.inputs.append(gs.Variable.empty())
    node.inputs[index] = tensor


def _to_mul_add(bn: gs.Node, scale: np.ndarray, shift: np.ndarray, graph: gs.Graph, ctx: PassContext) -> bool:
    x, y = bn.inputs[0], bn.outputs[0]
    if x.shape is None and y.shape is None:
        annotate_shapes(graph, ctx.log)
    rank = len(x.shape) if x.shape is not None else len(y.shape) if y.shape is not None else None
    if rank is None:
        ctx.log.append(f"fold_batchnorm: {bn.name} kept: rank of input '{x.name}' unknown")
        return False
    dtype = x.dtype if x.dtype is not None else np.float32
    shape = (-1,) + (1,) * (rank - 2)
    name = bn.name or y.name
    s = gs.Constant(tensor_name(graph, f"{name}_scale"), scale.reshape(shape).astype(dtype))
    t = gs.Constant(tensor_name(graph, f"{name}_shift"), shift.reshape(shape).astype(dtype))
    scaled = gs.Variable(tensor_name(graph, f"{name}_scaled"), dtype=x.dtype, shape=x.shape)
    graph.nodes.append(gs.Node("Mul", name=f"{name}_mul", inputs=[x, s], outputs=[scaled]))
    graph.nodes.append(gs.Node("Add", name=f"{name}_add", inputs=[scaled, t], outputs=[y]))
    bn.outputs.clear()
    ctx.log.append(f"fold_batchnorm: {bn.name} rewritten as Mul+Add")
    return True
