"""Map the rotary position embedding of Q and K onto the TrtglmRotary plugin op, and back.

Why: exporters write rotary embedding as a dozen shuffles and elementwise ops per tensor (slice the rotated
channels, split the pairs, negate, stack, reshape, two Muls, an Add, a Concat with the unrotated channels), each
a pass over Q or K in memory; the TrtglmRotary plugin (plugins/rotary) reads Q and K once and writes them once, in
one launch for both.

rotary_to_plugin matches, per tensor, out = x_rot * C + rotate(x_rot) * S where (dims on the last axis)
  x_rot   x [B, H, S, D] itself (full rotary, r = D) or Slice(x, 0:r), then out = Concat(that, Slice(x, r:))
  rotate  interleaved pairs (GLM, GPT-J): Reshape(Concat(Unsqueeze(-x_rot[1::2], -1), Unsqueeze(x_rot[0::2], -1)))
          halves (Llama's rotate_half):   Concat(-x_rot[r/2:], x_rot[:r/2])
  C, S    interleaved: repeat_interleave(c, 2) of a table c [B, 1, S, r/2] (Reshape(Expand(Unsqueeze(c, -1))));
          halves: a table [B, 1, S, r] whose halves are equal by construction (Cos/Sin/Cast/Unsqueeze/scalar Mul
          of a Concat(f, f)), as HF's rotary embedding builds it; its first half is the plugin's table
Two such tensors that share C and S and agree on batch, sequence and head_dim (a layer's Q and K) become one
TrtglmRotary(q, k, cos, sin) -> (q_out, k_out), domain "trtglm", with rotary_dim = r and interleaved; cos and sin
[B, S, r/2] float32 are the tables with their head axis squeezed (and a Cast where they are not float32). Which
of the two is called q does not matter: the op rotates both the same way. Two tensors are not paired when either
depends on the other's result (the plugin node would close a cycle). What stays decomposed is logged with why:
unknown shapes, tables that broadcast over the batch, a tensor with no partner, a dtype the plugin lacks.

rotary_from_plugin is the ONNX-level fallback: each TrtglmRotary back to standard ops (pairs as a [.., r/2, 2] or
[.., 2, r/2] reshape, a c - d s and d c + a s, the unrotated channels concatenated back), writing the same tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from trtglm.passes.match import constant_value, float_cast_source, producer, same_dim, single_consumer
from trtglm.passes.naming import node_name
from trtglm.passes.plugin_graph import (DOMAIN, FLOATS, PLUGIN_ATTRS, Emitter, Skip, dtype_name, last_dim,
                                        tensor_type)

if TYPE_CHECKING:
    from trtglm.passes import PassContext

OP = "TrtglmRotary"
TO_END = np.iinfo(np.int64).max
TABLE_OPS = ("Cos", "Sin", "Cast", "Unsqueeze")  # what may lie between Concat(f, f) and a halves-form table


@dataclass
class _Rotation:
    """One rotated tensor: x [B, H, S, D] -> out, now written by `last`."""

    x: gs.Tensor
    out: gs.Tensor
    last: gs.Node
    cos: gs.Tensor  # interleaved: c [B, 1, S, r/2]; halves: C [B, 1, S, r] (its first half is used)
    sin: gs.Tensor
    rotary_dim: int
    interleaved: int

    def key(self) -> tuple:
        return id(self.cos), id(self.sin), self.rotary_dim, self.interleaved


def rotary_to_plugin(graph: gs.Graph, ctx: PassContext) -> int:
    """Called by to_plugin_ops, which has given the tensors their shapes and types (the match reads them)."""
    outputs = {id(t) for t in graph.outputs}
    found: dict[tuple, list[_Rotation]] = {}
    for node in graph.nodes:  # in graph order: a layer's Q and K are paired before the next layer's
        try:
            rotation = _match(node, outputs)
        except Skip as why:
            ctx.log.append(f"to_plugin_ops: rotary at Add '{node.name}' kept: {why}")
            continue
        if rotation is not None:
            found.setdefault(rotation.key(), []).append(rotation)
    tables: dict[tuple, gs.Tensor] = {}
    rewrites = 0
    for group in found.values():
        while group:
            first = group.pop(0)
            partner = next((r for r in group if _pairs(first, r)), None)
            if partner is None:
                ctx.log.append(f"to_plugin_ops: rotary of '{first.x.name}' kept: no second tensor with the same "
                               "cos/sin, batch, sequence, head size and type that does not depend on it")
                continue
            group.remove(partner)
            _rewrite(graph, first, partner, tables, ctx)
            rewrites += 1
    return rewrites


def _match(add: gs.Node, outputs: set[int]) -> _Rotation | None:
    """The rotation whose Add is `add`; None when `add` is no rotation; Skip when it is one the plugin cannot take."""
    if add.op != "Add" or len(add.inputs) != 2:
        return None
    muls = [producer(t) for t in add.inputs]
    if any(m is None or m.op != "Mul" or len(m.inputs) != 2 for m in muls):
        return None
    for m_cos, m_sin in (muls, muls[::-1]):
        for rotated, table in (m_sin.inputs, m_sin.inputs[::-1]):
            found = _rotated(rotated)
            if found is None or not any(t is found[0] for t in m_cos.inputs):
                continue
            x_rot, interleaved = found
            other = m_cos.inputs[1] if m_cos.inputs[0] is x_rot else m_cos.inputs[0]
            return _complete(add, x_rot, interleaved, other, table, outputs)
    return None


def _complete(add, x_rot, interleaved, c_full, s_full, outputs) -> _Rotation:
    r = last_dim(x_rot)
    if r is None or r % 2:
        raise Skip(f"the rotated channels of '{x_rot.name}' are not an even, known number")
    x, out, last = x_rot, add.outputs[0], add
    cut = _last_axis_slice(x_rot)
    if cut is not None and cut[1:] == (0, r, 1):
        x = cut[0]
        concat = single_consumer(out, outputs)
        tail = _last_axis_slice(concat.inputs[1]) if concat is not None and concat.op == "Concat" and \
            len(concat.inputs) == 2 and concat.inputs[0] is out and _is_last_axis(concat, concat.outputs[0]) \
            else None
        if tail is None or tail[0] is not x or tail[1] != r or tail[3] != 1 or tail[2] != last_dim(x):
            raise Skip(f"the rotated channels of '{x.name}' are not concatenated back with its other channels")
        out, last = concat.outputs[0], concat
    if x.shape is None or len(x.shape) != 4:
        raise Skip(f"'{x.name}' is not known to be 4-D [batch, heads, seq, head_dim]")
    if dtype_name(x) not in FLOATS:
        raise Skip(f"'{x.name}' has dtype {dtype_name(x)}, the plugin takes {'/'.join(FLOATS)}")
    tables = []
    for full in (c_full, s_full):
        full = _before_float_cast(full)
        table = _repeated_table(full, r) if interleaved else (full if _duplicated_halves(full) else None)
        if table is None:
            raise Skip(f"'{full.name}' is not a cos/sin table repeated the way {_FORM[interleaved]} pairs need")
        shape = table.shape
        if shape is None or len(shape) != 4 or shape[1] != 1:
            raise Skip(f"cos/sin table '{table.name}' is not known to be [batch, 1, seq, channels]")
        if not (same_dim(shape[0], x.shape[0]) and same_dim(shape[2], x.shape[2])):
            raise Skip(f"cos/sin table '{table.name}' {list(shape)} does not have the batch and sequence of "
                       f"'{x.name}' {list(x.shape)} (the plugin takes one row per token)")
        tables.append(table)
    return _Rotation(x, out, last, tables[0], tables[1], r, int(interleaved))


_FORM = {0: "half-split", 1: "interleaved"}


def _pairs(a: _Rotation, b: _Rotation) -> bool:
    if dtype_name(a.x) != dtype_name(b.x):
        return False
    if not all(same_dim(a.x.shape[i], b.x.shape[i]) for i in (0, 2, 3)):
        return False
    return not (_reaches(a.last, b.x) or _reaches(b.last, a.x))


def _reaches(node: gs.Node, tensor: gs.Tensor) -> bool:
    """Whether `tensor` is computed from `node`'s outputs."""
    seen, stack = set(), [tensor]
    while stack:
        t = stack.pop()
        for p in t.inputs:
            if p is node:
                return True
            if id(p) not in seen:
                seen.add(id(p))
                stack.extend(p.inputs)
    return False


def _rewrite(graph: gs.Graph, a: _Rotation, b: _Rotation, tables: dict, ctx: PassContext) -> None:
    cos = _plugin_table(graph, a.cos, a, tables, ctx.opset)
    sin = _plugin_table(graph, a.sin, a, tables, ctx.opset)
    for rotation in (a, b):  # detach first: the plugin is about to write these tensors
        rotation.last.outputs.clear()
    attrs = {"rotary_dim": a.rotary_dim, "interleaved": a.interleaved, **PLUGIN_ATTRS}
    name = node_name(graph, f"{a.out.name}_{OP}")
    graph.nodes.append(gs.Node(OP, name=name, domain=DOMAIN, attrs=attrs, inputs=[a.x, b.x, cos, sin],
                               outputs=[a.out, b.out]))
    ctx.log.append(f"to_plugin_ops: rotary of '{a.x.name}' and '{b.x.name}' -> {OP} '{name}' (rotary_dim "
                   f"{a.rotary_dim} of {last_dim(a.x) or '?'}, {_FORM[a.interleaved]})")


def _plugin_table(graph, table, rotation, tables, opset) -> gs.Tensor:
    """[B, S, r/2] float32 from a matched table (halves: its first half); one per table, shared by the plugins."""
    key = (id(table), rotation.interleaved)
    if key not in tables:
        new = Emitter(graph, f"{table.name}_rotary", table, opset)
        half = table if rotation.interleaved else new.slice(table, 0, rotation.rotary_dim // 2, 3)
        squeezed = new.axes_op("Squeeze", half, [1])
        if dtype_name(table) != "float32":
            squeezed = new.op("Cast", [squeezed], new.var("Cast", dtype=np.float32), to=onnx.TensorProto.FLOAT)
        tables[key] = squeezed
    return tables[key]


# --- the pieces of the pattern -------------------------------------------------------------------------------


def _rotated(t: gs.Tensor) -> tuple[gs.Tensor, int] | None:
    """(x_rot, interleaved) when `t` is x_rot with its pairs rotated by a quarter turn, (a, d) -> (-d, a)."""
    node = producer(t)
    if node is None:
        return None
    if node.op == "Concat" and len(node.inputs) == 2 and _is_last_axis(node, t):  # halves: (-x2, x1)
        neg = producer(node.inputs[0])
        second = _last_axis_slice(neg.inputs[0]) if neg is not None and neg.op == "Neg" else None
        first = _last_axis_slice(node.inputs[1])
        if second is None or first is None or first[0] is not second[0]:
            return None
        r = last_dim(first[0])
        if r is None or r % 2 or first[1:] != (0, r // 2, 1) or second[1:] != (r // 2, r, 1):
            return None
        return first[0], 0
    if node.op == "Reshape":  # interleaved: stack((-x[1::2], x[0::2]), -1) flattened back to x's shape
        stack = producer(node.inputs[0])
        if stack is None or stack.op != "Concat" or len(stack.inputs) != 2 or not _is_last_axis(stack, stack.outputs[0]):
            return None
        parts = [_unsqueezed_last(u) for u in stack.inputs]
        if any(p is None for p in parts):
            return None
        neg = producer(parts[0])
        odd = _last_axis_slice(neg.inputs[0]) if neg is not None and neg.op == "Neg" else None
        even = _last_axis_slice(parts[1])
        if odd is None or even is None or odd[0] is not even[0]:
            return None
        src = odd[0]
        r = last_dim(src)
        if r is None or r % 2 or odd[1:] != (1, r, 2) or even[1:] not in ((0, r, 2), (0, r - 1, 2)):
            return None
        if t.shape is None or src.shape is None or len(t.shape) != len(src.shape) or \
                not all(same_dim(p, q) for p, q in zip(t.shape, src.shape)):
            return None
        return src, 1
    return None


def _repeated_table(full: gs.Tensor, r: int) -> gs.Tensor | None:
    """c when `full` is repeat_interleave(c, 2) on the last axis (Reshape(Expand(Unsqueeze(c, -1), [.., 2]))) and
    has r channels; else None."""
    reshape = producer(full)
    expand = producer(reshape.inputs[0]) if reshape is not None and reshape.op == "Reshape" else None
    if expand is None or expand.op != "Expand":
        return None
    target = constant_value(expand.inputs[1])
    if target is None or target.size == 0 or int(target.reshape(-1)[-1]) != 2 or \
            any(int(v) != 1 for v in target.reshape(-1)[:-1]):
        return None
    c = _unsqueezed_last(expand.inputs[0])
    if c is None or last_dim(c) != r // 2 or last_dim(full) != r or c.shape is None or full.shape is None or \
            len(c.shape) != len(full.shape) or not all(same_dim(p, q) for p, q in zip(c.shape[:-1], full.shape[:-1])):
        return None
    return c


def _duplicated_halves(t: gs.Tensor) -> bool:
    """Whether `t`'s last axis is two equal halves by construction: an elementwise function (TABLE_OPS, or a Mul
    by a scalar constant) of Concat(f, f) on the last axis; Unsqueezes on other axes are allowed."""
    for _ in range(16):
        node = producer(t)
        if node is None:
            return False
        if node.op == "Concat":
            return len(node.inputs) == 2 and node.inputs[0] is node.inputs[1] and _is_last_axis(node, t)
        if node.op == "Mul" and len(node.inputs) == 2:
            scalar = [constant_value(i) for i in node.inputs]
            if scalar[1] is not None and scalar[1].size == 1:
                t = node.inputs[0]
            elif scalar[0] is not None and scalar[0].size == 1:
                t = node.inputs[1]
            else:
                return False
        elif node.op in TABLE_OPS:
            if node.op == "Unsqueeze":
                axes = _axes(node, len(t.shape)) if t.shape else []
                if not axes or len(t.shape) - 1 in axes:
                    return False
            t = node.inputs[0]
        else:
            return False
    return False


def _before_float_cast(t: gs.Tensor) -> gs.Tensor:
    """The input of the float-to-float Casts that make `t` (an FP16 graph casts the FP32 tables where Q and K
    read them); the plugin takes float32 tables, so the earlier, finer ones are used."""
    while (source := float_cast_source(t)) is not None:
        t = source
    return t


def _last_axis_slice(t: gs.Tensor) -> tuple[gs.Tensor, int, int, int] | None:
    """(source, start, end, step) when `t` is a one-axis Slice of the source's last axis with constant,
    non-negative bounds; end clamped to the source's last dim (which must be known)."""
    node = producer(t)
    if node is None or node.op != "Slice" or len(node.inputs) < 3 or node.inputs[0].shape is None:
        return None
    src, given = node.inputs[0], [i for i in node.inputs[1:5]]
    values = [None if i.is_empty() else constant_value(i) for i in given]
    if any((v is None and not i.is_empty()) or (v is not None and v.size != 1) for i, v in zip(given, values)):
        return None
    start, end = int(values[0].reshape(-1)[0]), int(values[1].reshape(-1)[0])
    axis = int(values[2].reshape(-1)[0]) if len(values) > 2 and values[2] is not None else 0
    step = int(values[3].reshape(-1)[0]) if len(values) > 3 and values[3] is not None else 1
    rank, dim = len(src.shape), last_dim(src)
    if dim is None or rank == 0 or axis % rank != rank - 1 or start < 0 or end < 0:
        return None
    return src, start, min(end, dim), step


def _unsqueezed_last(t: gs.Tensor) -> gs.Tensor | None:
    """u when `t` = Unsqueeze(u) with a new last axis, else None."""
    node = producer(t)
    if node is None or node.op != "Unsqueeze" or t.shape is None:
        return None
    return node.inputs[0] if _axes(node, len(t.shape)) == [len(t.shape) - 1] else None


def _axes(node: gs.Node, rank: int) -> list[int]:
    """A Squeeze/Unsqueeze/Concat's axes, made non-negative against the output rank; [] when not constant."""
    if node.op == "Concat":
        return [int(node.attrs.get("axis", 0)) % rank]
    value = constant_value(node.inputs[1]) if len(node.inputs) > 1 else np.asarray(node.attrs.get("axes", []))
    return [] if value is None else sorted(int(a) % rank for a in np.asarray(value).reshape(-1))


def _is_last_axis(concat: gs.Node, out: gs.Tensor) -> bool:
    return out.shape is not None and len(out.shape) > 0 and _axes(concat, len(out.shape)) == [len(out.shape) - 1]


# --- rotary_from_plugin --------------------------------------------------------------------------------------


def rotary_from_plugin(graph: gs.Graph, ctx: PassContext) -> int:
    rewrites = 0
    for node in [n for n in graph.nodes if n.op == OP and n.domain == DOMAIN]:
        r, interleaved = int(node.attrs.get("rotary_dim", 0)), int(node.attrs.get("interleaved", 1))
        q, k, cos, sin = node.inputs[:4]
        outs = list(node.outputs)
        node.outputs.clear()
        new = Emitter(graph, node.name, q, ctx.opset)
        pair_axis = 4 if interleaved else 3  # [B, H, S, r/2, 2] or [B, H, S, 2, r/2]
        c, s = (_fallback_table(new, t, q, pair_axis) for t in (cos, sin))
        for x, out in zip((q, k), outs):
            _emit_rotation(new, x, out, c, s, r, pair_axis)
        ctx.log.append(f"from_plugin_ops: {OP} '{node.name}' -> {len(new.nodes)} standard ops")
        rewrites += 1
    return rewrites


def _fallback_table(new: Emitter, table: gs.Tensor, like: gs.Tensor, pair_axis: int) -> gs.Tensor:
    """[B, S, r/2] -> [B, 1, S, r/2, 1] (interleaved) or [B, 1, S, 1, r/2], in the rotated tensor's type."""
    if dtype_name(like) != dtype_name(table):
        table = new.op("Cast", [table], new.var("Cast"), to=tensor_type(like))
    return new.axes_op("Unsqueeze", new.axes_op("Unsqueeze", table, [1]), [pair_axis])


def _emit_rotation(new: Emitter, x, out, c, s, r: int, pair_axis: int) -> None:
    x_rot = new.slice(x, 0, r, 3) if r else x
    pairs = new.op("Reshape", [x_rot, new.const("pairs", [0, 0, 0, -1, 2] if pair_axis == 4 else [0, 0, 0, 2, -1],
                                                 np.int64)])
    a, d = (new.slice(pairs, i, i + 1, pair_axis) for i in (0, 1))
    first = new.op("Sub", [new.op("Mul", [a, c]), new.op("Mul", [d, s])])
    second = new.op("Add", [new.op("Mul", [d, c]), new.op("Mul", [a, s])])
    rotated = new.op("Concat", [first, second], axis=pair_axis)
    if not r:
        new.op("Reshape", [rotated, new.const("heads", [0, 0, 0, -1], np.int64)], out)
        return
    flat = new.op("Reshape", [rotated, new.const("heads", [0, 0, 0, -1], np.int64)])
    new.op("Concat", [flat, new.slice(x, r, TO_END, 3)], out, axis=3)
