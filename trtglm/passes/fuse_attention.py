"""Recognise scaled-dot-product attention blocks; in native mode, rewrite each as one opset-23 Attention node.

Why: TensorRT (10.14+) parses the ONNX Attention op into its IAttention layer, which runs fused multi-head
attention kernels (no [B, H, Sq, Sk] scores tensor in memory); the decomposed MatMul/Softmax/MatMul form only
gets there when Myelin's pattern matching recognises it, which an exporter's scale placement, mask arithmetic
or NaN guard can defeat. trtglm's INT8 policy keeps the attention BMMs in float, so the recognised blocks are
also the part of the graph insert_qdq must leave alone.

Matched, ending at a Softmax over the last axis (every tensor between Q4/K4/V4 and Y has a single consumer and
is no graph output; Q, K, V are not constants):
  Q4 [B,Hq,Sq,D]   any producer (a head split, or a rotary-embedding subgraph)
  K^T              Transpose(perm 0,1,3,2) of K4 [B,Hkv,Sk,D], or Transpose(perm 0,2,3,1) of the [B,Sk,Hkv,D]
                   head split (then K4 is a new Transpose(0,2,1,3) of it), or (PyTorch's dynamo exporter)
                   Reshape(Transpose(Reshape(K4, [B*H, Sk, D]), perm 0,2,1), [B, H, D, Sk])
  scales           Mul/Div by constant scalars on Q4, on K (before or after the transpose) and on the scores;
                   their product is the Attention `scale`
  scores = MatMul(Q4, K^T) [* scales] [+ mask ...] -> Softmax(axis=-1) [-> Where(IsNaN(p), 0, p)] -> MatMul(P, V4)
  mask             the other inputs of up to three Adds (a padding mask, a relative position bias): float additive
                   terms from anywhere, of rank <= 4; native mode sums them into one mask
  GQA              K4 and V4 both behind HF's repeat_kv (Unsqueeze(axis 2) -> Expand -> Reshape): the unexpanded
                   K/V go to Attention, which repeats the Hkv heads itself
Modes (ctx.attention): "decomposed" only recognises and logs each block; "native" (opset >= 23) replaces it by
Attention(Q4, K4, V4[, mask]) with 4-D inputs, `scale` always set, softmax_precision = FLOAT, writing the old Y.

Where the fused op differs from the decomposed graph (ONNX Attention-23 with its errata; ONNX Runtime 1.32 CPU):
- A fully masked row (every key's bias -inf: a -inf float mask or the SDPA Where(mask, 0, -inf)) gives 0, not
  the NaN of a plain Softmax; so it equals the SDPA export's NaN-guarded form, and replaces NaN otherwise.
  ORT also gives 0 for a row masked entirely with finfo(float32).min (the HF transformers mask), where the
  decomposed graph averages V; -10000 masks give that average in both. Only padded query rows see this.
- ORT checks mask.shape[-2] == Sq, although the spec lets the query axis broadcast, so a mask not known to be
  [..., Sq, Sk] (the BERT [B,1,1,Sk] mask) is Expanded to it first (Shape(Q4), Shape(K4) -> Expand).
- softmax_precision = FLOAT: an FP16 graph computes the softmax in FP32 (more accurate, not bit-identical),
  and the constant scales are multiplied once (float64, stored as float32) instead of applied one by one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto

from trtglm.errors import ConfigError
from trtglm.passes.fold_constants import annotate_shapes
from trtglm.passes.match import constant_value, producer, same_dim, single_consumer
from trtglm.passes.naming import node_name, tensor_name

if TYPE_CHECKING:
    from trtglm.passes import PassContext

ATTENTION_OPSET = 23
MODES = ("decomposed", "native")
K_TRANSPOSED = [0, 1, 3, 2]  # K4 [B,H,Sk,D] -> K^T
K_SEQ_FIRST = [0, 2, 3, 1]  # [B,Sk,H,D] -> K^T
MAX_MASK_TERMS = 3  # additive terms between the scores and the Softmax


@dataclass
class _Block:
    q: gs.Tensor
    k: gs.Tensor  # K4 [B,Hkv,Sk,D], or [B,Sk,Hkv,D] when k_seq_first
    v: gs.Tensor
    masks: list[gs.Tensor]  # additive terms, summed into one Attention mask
    scale: float
    last: gs.Node  # MatMul(P, V4), whose output is Y
    k_seq_first: bool
    gqa: bool

    @property
    def y(self) -> gs.Tensor:
        return self.last.outputs[0]


def fuse_attention(graph: gs.Graph, ctx: PassContext) -> int:
    if ctx.attention not in MODES:
        raise ConfigError(f"attention mode {ctx.attention!r}: expected one of {', '.join(MODES)}")
    outputs = {id(t) for t in graph.outputs}
    blocks: list[_Block] = []
    shapes_annotated = False
    for softmax in [n for n in graph.nodes if n.op == "Softmax"]:
        block = _match_block(softmax, outputs, ctx.opset)
        if block is None:
            continue
        if _rank_problem(block) and not shapes_annotated:
            annotate_shapes(graph, ctx.log)
            shapes_annotated = True
        problem = _rank_problem(block)
        if problem:
            ctx.log.append(f"fuse_attention: block at {softmax.name} kept: {problem}")
            continue
        blocks.append(block)
    native = ctx.attention == "native"
    if native and ctx.opset < ATTENTION_OPSET:
        ctx.log.append(f"fuse_attention: {len(blocks)} blocks kept decomposed: opset {ctx.opset} < "
                       f"{ATTENTION_OPSET} has no Attention op (convert the model to opset {ATTENTION_OPSET})")
        native = False
    for block in blocks:
        ctx.log.append(f"fuse_attention: '{block.y.name}': {_describe(block)}"
                       + (f" -> Attention (scale={block.scale:.6g})" if native else ""))
        if native:
            _replace(graph, block)
        else:
            ctx.recognised["attention"] += 1
    graph.cleanup().toposort()
    return len(blocks)


# --- matching ------------------------------------------------------------------------------------------------


def _match_block(softmax: gs.Node, outputs: set[int], opset: int) -> _Block | None:
    if softmax.attrs.get("axis", -1 if opset >= 13 else 1) not in (-1, 3):
        return None
    probs = _skip_nan_guard(softmax.outputs[0], outputs)
    last = single_consumer(probs, outputs) if probs is not None else None
    if last is None or last.op != "MatMul" or last.inputs[0] is not probs:
        return None

    qk, masks = _scores_and_masks(softmax.inputs[0], outputs)
    if qk is None or any(m.shape is not None and len(m.shape) > 4 for m in masks):
        return None
    scale, q, k, k_seq_first = qk
    if scale <= 0:  # Attention applies sqrt(scale) to Q and K
        return None
    k, k_repeated = (k, False) if k_seq_first else _strip_repeat_kv(k)
    v, v_repeated = _strip_repeat_kv(last.inputs[1])
    if k_repeated != v_repeated or any(isinstance(t, gs.Constant) for t in (q, k, v)):
        return None
    return _Block(q, k, v, masks, scale, last, k_seq_first, k_repeated)


def _scores_and_masks(tensor: gs.Tensor, outputs: set[int], depth: int = 0):
    """Softmax input = scores [+ mask] [+ mask ...] (a relative position bias and a padding mask: MPNet, T5):
    (the _match_scores tuple, the additive terms innermost first), or (None, [])."""
    qk = _match_scores(tensor, outputs)
    if qk is not None:
        return qk, []
    add = producer(tensor)
    if depth >= MAX_MASK_TERMS or add is None or add.op != "Add" or len(add.inputs) != 2 \
            or not _is_chain(tensor, outputs):
        return None, []
    for i in (0, 1):
        qk, masks = _scores_and_masks(add.inputs[i], outputs, depth + 1)
        if qk is not None:
            return qk, [*masks, add.inputs[1 - i]]
    return None, []


def _match_scores(scores: gs.Tensor, outputs: set[int]) -> tuple[float, gs.Tensor, gs.Tensor, bool] | None:
    """scores = MatMul(Q4 [* s], K^T [* s]) [* s]: (the product of the scales, Q4, K, K is [B,Sk,H,D])."""
    score_scale, scores = _strip_scales(scores, outputs)
    qk = producer(scores)
    if qk is None or qk.op != "MatMul" or not _is_chain(scores, outputs):
        return None
    q_scale, q = _strip_scales(qk.inputs[0], outputs)
    kt_scale, kt = _strip_scales(qk.inputs[1], outputs)
    transpose = producer(kt)
    if transpose is not None and transpose.op == "Reshape" and _is_chain(kt, outputs):
        k4 = _unflattened_kt(transpose, outputs)
        if k4 is None:
            return None
        k_scale, k = _strip_scales(k4, outputs)
        return score_scale * q_scale * kt_scale * k_scale, q, k, False
    if transpose is None or transpose.op != "Transpose" or not _is_chain(kt, outputs):
        return None
    perm = list(transpose.attrs.get("perm", []))
    if perm not in (K_TRANSPOSED, K_SEQ_FIRST):
        return None
    k_scale, k = _strip_scales(transpose.inputs[0], outputs)
    return score_scale * q_scale * kt_scale * k_scale, q, k, perm == K_SEQ_FIRST


def _unflattened_kt(reshape: gs.Node, outputs: set[int]) -> gs.Tensor | None:
    """K4 when K^T = Reshape(Transpose(Reshape(K4, [B*H, Sk, D]), perm 0,2,1), [B, H, D, Sk]), the form of
    PyTorch's dynamo exporter (its SDPA decomposition); else None."""
    swapped = reshape.inputs[0]
    transpose = producer(swapped)
    if transpose is None or transpose.op != "Transpose" or list(transpose.attrs.get("perm", [])) != [0, 2, 1] \
            or not _is_chain(swapped, outputs):
        return None
    flat = transpose.inputs[0]
    flatten = producer(flat)
    if flatten is None or flatten.op != "Reshape" or not _is_chain(flat, outputs):
        return None
    k4, target = flatten.inputs[0], _shape_values(reshape.inputs[1])
    if (k4.shape is not None and len(k4.shape) != 4) or (target is not None and len(target) != 4):
        return None
    return k4


def _skip_nan_guard(probs: gs.Tensor, outputs: set[int]) -> gs.Tensor | None:
    """The tensor P that feeds MatMul(P, V): the Softmax output, or Where(IsNaN(p), 0, p) of it (SDPA export)."""
    consumers = {id(n): n for n in probs.outputs}
    if len(consumers) != 2 or id(probs) in outputs:
        return probs
    isnan = next((n for n in consumers.values() if n.op == "IsNaN"), None)
    where = next((n for n in consumers.values() if n.op == "Where"), None)
    if isnan is None or where is None or single_consumer(isnan.outputs[0], outputs) is not where:
        return None
    cond, zero, value = where.inputs
    zero_value = constant_value(zero)
    if cond is not isnan.outputs[0] or value is not probs or zero_value is None or zero_value.size != 1 \
            or float(zero_value.reshape(-1)[0]) != 0.0:
        return None
    return where.outputs[0]


def _strip_scales(tensor: gs.Tensor, outputs: set[int]) -> tuple[float, gs.Tensor]:
    """Walk back over Mul/Div by constant scalars whose outputs feed only the chain: (their product, the input)."""
    factor = 1.0
    while _is_chain(tensor, outputs):
        node = producer(tensor)
        if node is None or node.op not in ("Mul", "Div") or len(node.inputs) != 2:
            break
        operands = [(1, 0)] if node.op == "Div" else [(1, 0), (0, 1)]
        for const_at, var_at in operands:
            value = constant_value(node.inputs[const_at])
            if value is not None and value.size == 1 and value.ndim <= 4 and np.isfinite(value).all() \
                    and float(value.reshape(-1)[0]) != 0.0 and not isinstance(node.inputs[var_at], gs.Constant):
                c = float(value.reshape(-1)[0])
                factor *= 1.0 / c if node.op == "Div" else c
                tensor = node.inputs[var_at]
                break
        else:
            break
    return factor, tensor


def _strip_repeat_kv(tensor: gs.Tensor) -> tuple[gs.Tensor, bool]:
    """HF's repeat_kv, Reshape(Expand(Unsqueeze(x, axis 2)), [B, H*n_rep, S, D]): (x, True); else (tensor, False)."""
    reshape = producer(tensor)
    expand = producer(reshape.inputs[0]) if reshape is not None and reshape.op == "Reshape" else None
    unsqueeze = producer(expand.inputs[0]) if expand is not None and expand.op == "Expand" else None
    if unsqueeze is None or unsqueeze.op != "Unsqueeze":
        return tensor, False
    axes = unsqueeze.attrs.get("axes")
    if axes is None and len(unsqueeze.inputs) > 1:
        axes = constant_value(unsqueeze.inputs[1])
    target = constant_value(reshape.inputs[1])
    if axes is None or [int(a) for a in np.asarray(axes).reshape(-1)] not in ([2], [-3]) \
            or (target is not None and target.size != 4):
        return tensor, False
    return unsqueeze.inputs[0], True


def _rank_problem(block: _Block) -> str | None:
    """Attention reads 3-D inputs as [B, S, hidden]: Q, K and V must be known to be 4-D."""
    for role, tensor in (("Q", block.q), ("K", block.k), ("V", block.v)):
        if tensor.shape is None:
            return f"rank of {role} '{tensor.name}' unknown"
        if len(tensor.shape) != 4:
            return f"{role} '{tensor.name}' has rank {len(tensor.shape)}, expected 4"
    return None


# --- reporting -----------------------------------------------------------------------------------------------


def _describe(block: _Block) -> str:
    heads = _heads(block.q)
    rotary = _is_rotary(block.q) and _is_rotary(block.k)
    return (f"heads={heads if heads is not None else '?'}, gqa={'yes' if block.gqa else 'no'}, "
            f"rotary={'yes' if rotary else 'no'}, mask={_mask_text(block.masks)}")


def _mask_text(masks: list[gs.Tensor]) -> str:
    return "no" if not masks else "yes" if len(masks) == 1 else f"{len(masks)} terms"


def _heads(q: gs.Tensor) -> int | None:
    """Q4's head count: from its shape, else from the Reshape behind its Transpose (its constant heads entry, or
    hidden / head_dim when that entry is -1)."""
    if q.shape is not None and isinstance(q.shape[1], (int, np.integer)) and q.shape[1] > 0:
        return int(q.shape[1])
    transpose = producer(q)
    if transpose is None or transpose.op != "Transpose" or list(transpose.attrs.get("perm", [])) != [0, 2, 1, 3]:
        return None
    reshape = producer(transpose.inputs[0])
    if reshape is None or reshape.op != "Reshape":
        return None
    dims = _shape_values(reshape.inputs[1])
    if dims is None or len(dims) != 4 or dims[2] is None:
        return None
    if dims[2] > 0:
        return dims[2]
    hidden = reshape.inputs[0].shape[-1] if reshape.inputs[0].shape else None
    if dims[2] == -1 and dims[3] and dims[3] > 0 and isinstance(hidden, (int, np.integer)) and hidden > 0:
        return int(hidden) // dims[3]  # view(B, S, -1, head_dim)
    return None


def _shape_values(shape: gs.Tensor) -> list[int | None] | None:
    """A shape tensor's entries: constant ones as ints, computed ones as None (a Concat of pieces)."""
    value = constant_value(shape)
    if value is not None:
        return [int(v) for v in value.reshape(-1)]
    concat = producer(shape)
    if concat is None or concat.op != "Concat":
        return None
    dims: list[int | None] = []
    for piece in concat.inputs:
        value = constant_value(piece)
        if value is not None:
            dims += [int(v) for v in value.reshape(-1)]
        elif piece.shape is not None and len(piece.shape) == 1 and isinstance(piece.shape[0], (int, np.integer)):
            dims += [None] * int(piece.shape[0])
        else:
            return None
    return dims


def _is_rotary(tensor: gs.Tensor) -> bool:
    """Loosely: x*cos + rotate_half(x)*sin, an Add of two Muls, possibly concatenated with a pass-through part."""
    node = producer(tensor)
    if node is not None and node.op == "Concat":
        return any(_is_rotary(t) for t in node.inputs)
    return node is not None and node.op == "Add" and all(
        producer(t) is not None and producer(t).op == "Mul" for t in node.inputs)


# --- rewriting -----------------------------------------------------------------------------------------------


def _replace(graph: gs.Graph, block: _Block) -> None:
    y = block.y
    k = block.k
    if block.k_seq_first:
        shape = [k.shape[i] for i in (0, 2, 1, 3)] if k.shape is not None else None
        k = gs.Variable(tensor_name(graph, f"{block.k.name}_bhsd"), dtype=block.k.dtype, shape=shape)
        graph.nodes.append(gs.Node("Transpose", name=node_name(graph, f"{y.name}_k_transpose"),
                                   attrs={"perm": [0, 2, 1, 3]}, inputs=[block.k], outputs=[k]))
    inputs = [block.q, k, block.v]
    if block.masks:
        mask = block.masks[0]
        for term in block.masks[1:]:  # several additive terms (position bias + padding mask): their sum
            total = gs.Variable(tensor_name(graph, f"{y.name}_mask_sum"), dtype=mask.dtype)
            graph.nodes.append(gs.Node("Add", name=node_name(graph, f"{y.name}_mask_sum"), inputs=[mask, term],
                                       outputs=[total]))
            mask = total
        inputs.append(_fit_mask(graph, mask, block.q, k, y.name))
    block.last.outputs.clear()  # the decomposed chain is now dead; cleanup() removes it
    graph.nodes.append(gs.Node("Attention", name=node_name(graph, f"{y.name}_Attention"),
                               attrs={"scale": float(block.scale),
                                      "softmax_precision": int(TensorProto.FLOAT)},
                               inputs=inputs, outputs=[y]))


def _fit_mask(graph: gs.Graph, mask: gs.Tensor, q: gs.Tensor, k: gs.Tensor, base: str) -> gs.Tensor:
    """The mask as is when it is known to be [..., Sq, Sk]; else Expand(mask, [1, 1, Sq, Sk]) (ORT needs it)."""
    shape = mask.shape
    if shape is not None and len(shape) >= 2 and same_dim(shape[-2], q.shape[2]) and same_dim(shape[-1], k.shape[2]):
        return mask
    lengths = []
    for role, tensor in (("q", q), ("k", k)):
        length = gs.Variable(tensor_name(graph, f"{base}_{role}_len"), dtype=np.int64, shape=[1])
        graph.nodes.append(gs.Node("Shape", name=node_name(graph, f"{base}_{role}_len"), attrs={"start": 2, "end": 3},
                                   inputs=[tensor], outputs=[length]))
        lengths.append(length)
    ones = gs.Constant(tensor_name(graph, f"{base}_mask_ones"), np.ones(2, dtype=np.int64))
    target = gs.Variable(tensor_name(graph, f"{base}_mask_shape"), dtype=np.int64, shape=[4])
    graph.nodes.append(gs.Node("Concat", name=node_name(graph, f"{base}_mask_shape"), attrs={"axis": 0},
                               inputs=[ones, *lengths], outputs=[target]))
    expanded = gs.Variable(tensor_name(graph, f"{base}_mask"), dtype=mask.dtype)
    graph.nodes.append(gs.Node("Expand", name=node_name(graph, f"{base}_mask_expand"), inputs=[mask, target],
                               outputs=[expanded]))
    return expanded


# --- helpers -------------------------------------------------------------------------------------------------


def _is_chain(tensor: gs.Tensor, outputs: set[int]) -> bool:
    """An intermediate of the block: computed, one consumer, no graph output."""
    return producer(tensor) is not None and single_consumer(tensor, outputs) is not None
