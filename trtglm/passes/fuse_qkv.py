"""Fuse sibling projections (MatMuls that read one activation) into one MatMul whose output is Split.

Why: attention's Q, K and V projections (and SwiGLU's gate and up projections) multiply the same activation by
different weights. One GEMM with N = N_q + N_k + N_v is faster on GPUs than three small ones (one launch, one
read of the activation, better occupancy), and in an INT8 network the shared activation needs one Q/DQ anyway.
Concatenating along N keeps every output column's weights as they were, so the per-output-channel weight scales
are unchanged and the INT8 model computes exactly what the separate projections would.

Matched: two or more MatMul(x, W_i) with the same x and constant 2-D floating weights W_i of shape (K, N_i) with
one K and one dtype, each optionally followed by Add(., b_i) of a constant bias that broadcasts over the last
axis only (shape (N_i,) or (1, .., 1, N_i), of no higher rank than x) and is the MatMul's only consumer.
When some members have a bias, the others get a zero one (Whisper's k_proj has no bias). Rewritten as
  MatMul(x, concat(W_i)) [-> Add(., concat(b_i))] -> Split(axis=-1, sizes N_i)
whose outputs are the old output tensors (names, consumers and graph outputs kept). Weights shared with other
nodes stay as they are: the concatenation is a new constant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from trtglm.passes.match import constant_value
from trtglm.passes.naming import node_name, tensor_name

if TYPE_CHECKING:
    from trtglm.passes import PassContext

SPLIT_INPUT_OPSET = 13  # Split takes its sizes as an input from opset 13, as an attribute before


@dataclass
class _Member:
    matmul: gs.Node
    weight: np.ndarray
    bias_add: gs.Node | None
    bias: np.ndarray | None
    out: gs.Tensor


def fuse_qkv(graph: gs.Graph, ctx: PassContext) -> int:
    graph.toposort()
    outputs = {id(t) for t in graph.outputs}
    groups: dict[tuple, list[_Member]] = {}  # insertion order = order of the first member in the sorted graph
    for node in graph.nodes:
        member = _member(node, outputs)
        if member is not None:
            key = (id(node.inputs[0]), member.weight.shape[0], member.weight.dtype.str)
            groups.setdefault(key, []).append(member)
    fused = 0
    for members in groups.values():
        if len(members) < 2:
            continue
        x = members[0].matmul.inputs[0]
        out = _replace(graph, x, members, ctx.opset)
        sizes = "+".join(str(m.weight.shape[1]) for m in members)
        ctx.log.append(f"fuse_qkv: {len(members)} MatMuls on '{x.name}' -> '{out.name}' (N={sizes})")
        fused += 1
    graph.cleanup().toposort()
    return fused


# --- matching ------------------------------------------------------------------------------------------------


def _member(node: gs.Node, outputs: set[int]) -> _Member | None:
    """`node` as a projection: MatMul(x, constant 2-D float W) [+ Add(constant last-axis bias)], else None."""
    if node.op != "MatMul" or len(node.inputs) != 2 or isinstance(node.inputs[0], gs.Constant):
        return None
    weight = constant_value(node.inputs[1])
    if weight is None or weight.ndim != 2 or not np.issubdtype(weight.dtype, np.floating):
        return None
    out = node.outputs[0]
    add = out.outputs[0] if len(out.outputs) == 1 and id(out) not in outputs else None
    if add is not None and add.op == "Add" and len(add.inputs) == 2:
        other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
        bias = constant_value(other) if other is not out else None
        if bias is not None and _is_last_axis_bias(bias, weight, node.inputs[0]):
            return _Member(node, weight, add, bias, add.outputs[0])
    return _Member(node, weight, None, None, out)


def _is_last_axis_bias(bias: np.ndarray, weight: np.ndarray, x: gs.Tensor) -> bool:
    """Shape (N,) or (1, .., 1, N) of the weight's dtype, and not of higher rank than the MatMul output."""
    if bias.ndim == 0 or bias.dtype != weight.dtype or bias.shape[-1] != weight.shape[1]:
        return False
    if any(d != 1 for d in bias.shape[:-1]):
        return False
    return bias.ndim == 1 or (x.shape is not None and bias.ndim <= len(x.shape))


# --- rewriting -----------------------------------------------------------------------------------------------


def _replace(graph: gs.Graph, x: gs.Tensor, members: list[_Member], opset: int) -> gs.Tensor:
    """Build MatMul [+ Add] + Split in place of `members`; return the fused (pre-Split) tensor."""
    base = members[0].matmul.name or members[0].out.name
    sizes = np.array([m.weight.shape[1] for m in members], dtype=np.int64)
    weight = gs.Constant(tensor_name(graph, f"{base}_fused_weight"),
                         np.concatenate([m.weight for m in members], axis=1))
    fused = gs.Variable(tensor_name(graph, f"{base}_fused_output"), dtype=weight.values.dtype)
    new_nodes = [gs.Node("MatMul", name=node_name(graph, f"{base}_fused"), inputs=[x, weight], outputs=[fused])]
    if any(m.bias is not None for m in members):
        bias = gs.Constant(tensor_name(graph, f"{base}_fused_bias"), np.concatenate(
            [m.bias.reshape(-1) if m.bias is not None else np.zeros(m.weight.shape[1], m.weight.dtype)
             for m in members]))
        summed = gs.Variable(tensor_name(graph, f"{base}_fused_bias_output"), dtype=fused.dtype)
        new_nodes.append(gs.Node("Add", name=node_name(graph, f"{base}_fused_bias_add"), inputs=[fused, bias],
                                 outputs=[summed]))
        fused = summed
    outs = [m.out for m in members]
    for m in members:  # detach the old outputs; the old nodes are then dead and cleanup() removes them
        (m.bias_add or m.matmul).outputs.clear()
    name = node_name(graph, f"{base}_split")
    if opset >= SPLIT_INPUT_OPSET:
        split_sizes = gs.Constant(tensor_name(graph, f"{base}_split_sizes"), sizes)
        new_nodes.append(gs.Node("Split", name, {"axis": -1}, inputs=[fused, split_sizes], outputs=outs))
    else:
        new_nodes.append(gs.Node("Split", name, {"axis": -1, "split": sizes.tolist()}, inputs=[fused], outputs=outs))
    graph.nodes.extend(new_nodes)
    return fused


# --- helpers -------------------------------------------------------------------------------------------------
