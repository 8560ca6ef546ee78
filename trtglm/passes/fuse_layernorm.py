"""Fuse decomposed LayerNorm (and RMSNorm) subgraphs into one LayerNormalization (RMSNormalization) node.

Why: exporters often write LayerNorm as ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul/Add. TensorRT (8.6+)
maps an ONNX LayerNormalization onto its INormalizationLayer, one kernel that reduces in FP32 whatever the
network precision; the decomposed form is nine layers that TensorRT only sometimes re-fuses, and in a strongly
typed FP16 network its Pow/ReduceMean would run in FP16 and overflow. One node is also one thing for
insert_qdq to keep out of INT8 (normalization stays in float; only the GEMMs around it are quantized).

Matched, over the last axis only (ReduceMean axes=[-1] or [rank-1], keepdims=1; axes as attribute before
opset 18, as a constant input from opset 18):
  LayerNorm  d = x - ReduceMean(x); v = ReduceMean(d^2 | d*d); n = d / Sqrt(v + eps)  (or d * Reciprocal(Sqrt))
             y = n [* gamma] [+ beta]      ->  LayerNormalization(x, gamma|ones, beta|zeros, axis=-1, epsilon)
  RMSNorm    v = ReduceMean(x^2 | x*x); n = x / Sqrt(v + eps)  (or x * Reciprocal(Sqrt) | x * (1 / Sqrt));
             y = n [* gamma]
                                           ->  RMSNormalization(x, gamma|ones, axis=-1, epsilon)
Every intermediate tensor has a single consumer (d has exactly two: the square and the division) and is no
graph output. LayerNormalization needs opset >= 17 and RMSNormalization opset >= 23; below those the pass
leaves the graph alone and says so in ctx.log.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from trtglm.passes.fold_constants import annotate_shapes
from trtglm.passes.match import constant_value, float_cast_source, only_consumer, producer, single_consumer
from trtglm.passes.naming import node_name, tensor_name

if TYPE_CHECKING:
    from trtglm.passes import PassContext

LAYERNORM_OPSET = 17
RMSNORM_OPSET = 23


@dataclass
class _Match:
    kind: str  # "LayerNormalization" | "RMSNormalization"
    x: gs.Tensor
    eps: float
    nodes: list[gs.Node]
    out: gs.Tensor
    gamma: np.ndarray | None = None
    beta: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)


def fuse_layernorm(graph: gs.Graph, ctx: PassContext) -> int:
    if ctx.opset < LAYERNORM_OPSET:
        ctx.log.append(f"fuse_layernorm: skipped: opset {ctx.opset} < {LAYERNORM_OPSET} has no LayerNormalization")
        return 0
    outputs = set(id(t) for t in graph.outputs)
    used: set[int] = set()
    rewrites = 0
    shapes_annotated = False
    for reduce in [n for n in graph.nodes if n.op == "ReduceMean"]:
        if id(reduce) in used:
            continue
        match = match_norm(reduce, outputs)
        if match is None or any(id(n) in used for n in match.nodes):
            continue
        if match.kind == "RMSNormalization" and ctx.opset < RMSNORM_OPSET:
            # TODO: lower RMSNorm for opset < 23 once TensorRT's INormalizationLayer path for it is settled
            # (e.g. a LayerNormalization-free plugin or keep the decomposed form, which TensorRT runs as is).
            ctx.recognised["rmsnorm"] += 1
            ctx.log.append(f"fuse_layernorm: RMSNorm at {reduce.name} kept: opset {ctx.opset} < {RMSNORM_OPSET}")
            continue
        hidden = _hidden_size(match)
        if hidden is None and not shapes_annotated:
            annotate_shapes(graph, ctx.log)
            shapes_annotated = True
            hidden = _hidden_size(match)
        if hidden is None:
            ctx.log.append(f"fuse_layernorm: {match.kind} at {reduce.name} kept: hidden size unknown")
            continue
        params = _params(match, hidden)
        if params is None:
            ctx.log.append(f"fuse_layernorm: {match.kind} at {reduce.name} kept: gamma/beta do not fit hidden "
                           f"size {hidden}")
            continue
        _replace(graph, match, params)
        used.update(id(n) for n in match.nodes)
        ctx.log.append(f"fuse_layernorm: {len(match.nodes)} nodes -> {match.kind} '{match.out.name}' "
                       f"(epsilon={match.eps:g})")
        rewrites += 1
    graph.cleanup().toposort()
    return rewrites


# --- matching ------------------------------------------------------------------------------------------------


def match_norm(var_reduce: gs.Node, outputs: set[int]) -> _Match | None:
    """Match starting at the variance ReduceMean (the one that reduces the square). Also used by plugin_ops."""
    if not _reduces_last_axis(var_reduce):
        return None
    sq = var_reduce.inputs[0]
    square = producer(sq)
    if square is None or not only_consumer(sq, var_reduce, outputs):
        return None
    if square.op == "Pow" and _is_scalar(square.inputs[1], 2.0):
        base = square.inputs[0]
    elif square.op == "Mul" and square.inputs[0] is square.inputs[1]:
        base = square.inputs[0]
    else:
        return None
    tail = _match_tail(var_reduce, base, outputs)
    if tail is None:
        return None
    eps, tail_nodes, normalized, x = tail
    nodes = [square, var_reduce, *tail_nodes]

    center = producer(base)
    mean_reduce = producer(center.inputs[1]) if center is not None and center.op == "Sub" else None
    if (mean_reduce is not None and mean_reduce.op == "ReduceMean" and mean_reduce.inputs[0] is center.inputs[0]
            and _reduces_last_axis(mean_reduce) and only_consumer(center.inputs[1], center, outputs)):
        # LayerNorm: d = base feeds only the square and the division.
        consumers = {id(n) for n in base.outputs}
        if consumers != {id(square), id(tail_nodes[-1])} or id(base) in outputs:
            return None
        match = _Match("LayerNormalization", center.inputs[0], eps, [mean_reduce, center, *nodes], normalized)
    else:
        match = _Match("RMSNormalization", x, eps, nodes, normalized)

    gamma_mul = single_consumer(match.out, outputs)
    if gamma_mul is not None and gamma_mul.op == "Mul":
        gamma = _other_constant(gamma_mul, match.out)
        if gamma is not None:
            match.gamma, match.out = gamma, gamma_mul.outputs[0]
            match.nodes.append(gamma_mul)
    if match.kind == "LayerNormalization":
        beta_add = single_consumer(match.out, outputs)
        if beta_add is not None and beta_add.op == "Add":
            beta = _other_constant(beta_add, match.out)
            if beta is not None:
                match.beta, match.out = beta, beta_add.outputs[0]
                match.nodes.append(beta_add)
    return match


def _match_tail(var_reduce: gs.Node, base: gs.Tensor, outputs: set[int]):
    """ReduceMean -> Add(eps) -> Sqrt -> Div(base, .) | Reciprocal -> Mul(base, .): (eps, nodes, normalized, x).

    x is the tensor the last Div/Mul reads: base, or in an FP16 graph that reduces in FP32 (convert_fp16 keeps
    Pow/ReduceMean FP32) the FP16 twin of base (base Cast from it, or both Cast from one tensor), divided by the
    standard deviation or multiplied by the reciprocal Cast back to FP16."""
    add = single_consumer(var_reduce.outputs[0], outputs)
    if add is None or add.op != "Add":
        return None
    eps = _other_constant(add, var_reduce.outputs[0])
    if eps is None or eps.size != 1 or not np.isfinite(eps).all() or float(eps.reshape(-1)[0]) < 0:
        return None
    sqrt = single_consumer(add.outputs[0], outputs)
    if sqrt is None or sqrt.op != "Sqrt":
        return None
    nodes = [add, sqrt]

    def reader(t: gs.Tensor) -> tuple[gs.Tensor, gs.Node | None]:
        """(t, its one reader), past a float-to-float Cast (the mixed-precision form casts back to FP16)."""
        node = single_consumer(t, outputs)
        if node is not None and node.op == "Cast" and float_cast_source(node.outputs[0]) is not None:
            nodes.append(node)
            t, node = node.outputs[0], single_consumer(node.outputs[0], outputs)
        return t, node

    std, last = reader(sqrt.outputs[0])
    if last is None:
        return None
    if last.op == "Div" and _is_scalar(last.inputs[0], 1.0) and last.inputs[0] is not base or \
            last.op == "Reciprocal":
        # Reciprocal, or Div(1, Sqrt): how TorchScript exports torch.rsqrt (Llama's and T5's RMSNorm)
        if last.op == "Div" and last.inputs[1] is not std:
            return None
        nodes.append(last)
        inv, last = reader(last.outputs[0])
        if last is None or last.op != "Mul" or len(last.inputs) != 2 or not any(t is inv for t in last.inputs):
            return None
        x = last.inputs[1] if last.inputs[0] is inv else last.inputs[0]
    elif last.op == "Div" and last.inputs[1] is std:
        x = last.inputs[0]
    else:
        return None
    if not _same_values(x, base):
        return None
    nodes.append(last)
    return float(eps.reshape(-1)[0]), nodes, last.outputs[0], x


def _same_values(a: gs.Tensor, b: gs.Tensor) -> bool:
    """The same tensor, up to float-to-float Casts (one of the other, or both of one tensor)."""
    sa, sb = float_cast_source(a), float_cast_source(b)
    return a is b or sa is b or sb is a or (sa is not None and sa is sb)


def _reduces_last_axis(node: gs.Node) -> bool:
    if node.op != "ReduceMean" or not int(node.attrs.get("keepdims", 1)):
        return False
    if "axes" in node.attrs:
        axes = np.asarray(node.attrs["axes"]).reshape(-1)
    elif len(node.inputs) > 1 and not node.inputs[1].is_empty():
        axes = constant_value(node.inputs[1])
        if axes is None:
            return False
        axes = axes.reshape(-1)
    else:
        return False  # no axes: reduces over every axis
    if axes.size != 1:
        return False
    axis = int(axes[0])
    shape = node.inputs[0].shape
    return axis == -1 or (shape is not None and axis == len(shape) - 1)


# --- rewriting -----------------------------------------------------------------------------------------------


def _hidden_size(match: _Match) -> int | None:
    for shape in (match.x.shape, match.out.shape):
        if shape and isinstance(shape[-1], (int, np.integer)) and shape[-1] > 0:
            return int(shape[-1])
    for param in (match.gamma, match.beta):
        if param is not None and param.size > 1:
            return int(param.shape[-1])
    return None


def _params(match: _Match, hidden: int) -> tuple[np.ndarray, np.ndarray | None] | None:
    """(scale, bias) as 1-D arrays of the hidden size, or None when gamma/beta broadcast over more than the last
    axis (then they are not LayerNorm parameters)."""
    dtype = match.x.dtype if match.x.dtype is not None else np.float32
    fitted = []
    for param, fill in ((match.gamma, 1.0), (match.beta, 0.0)):
        if param is None:
            fitted.append(np.full(hidden, fill, dtype=dtype))
            continue
        if any(d != 1 for d in param.shape[:-1]) or (param.ndim and param.shape[-1] not in (1, hidden)):
            return None
        fitted.append(np.broadcast_to(param.reshape(-1), (hidden,)).astype(dtype))
    return fitted[0], (fitted[1] if match.kind == "LayerNormalization" else None)


def _replace(graph: gs.Graph, match: _Match, params) -> None:
    scale, bias = params
    base = match.out.name
    inputs = [match.x, gs.Constant(tensor_name(graph, f"{base}_scale"), scale)]
    if bias is not None:
        inputs.append(gs.Constant(tensor_name(graph, f"{base}_bias"), bias))
    out = match.out
    match.nodes[-1].outputs.clear()  # the old chain is now dead; cleanup() removes it
    graph.nodes.append(gs.Node(match.kind, name=node_name(graph, f"{base}_{match.kind}"),
                               attrs={"axis": -1, "epsilon": match.eps}, inputs=inputs, outputs=[out]))


# --- helpers -------------------------------------------------------------------------------------------------


def _other_constant(node: gs.Node, tensor: gs.Tensor) -> np.ndarray | None:
    """The constant value of `node`'s other input (binary op with `tensor` as one input), else None."""
    if len(node.inputs) != 2:
        return None
    if node.inputs[0] is tensor:
        other = node.inputs[1]
    elif node.inputs[1] is tensor:
        other = node.inputs[0]
    else:
        return None
    return constant_value(other)


def _is_scalar(tensor: gs.Tensor, expected: float) -> bool:
    value = constant_value(tensor)
    return value is not None and value.size == 1 and float(value.reshape(-1)[0]) == expected
