"""Map residual-add + RMSNorm/LayerNorm (+ INT8 QuantizeLinear) onto the TrtglmResidualNorm plugin op, and back.

Why: in a transformer block the residual Add, the normalization and the INT8 quantization of its output are three
memory-bound layers that read and write the whole activation. TensorRT fuses none of them across each other; the
TrtglmResidualNorm plugin (plugins/residual_norm) does all three in one read of the row. TensorRT's ONNX parser
turns a node whose op_type is not an ONNX op into a plugin layer, looking the creator up by op_type plus the
node's `plugin_version` and `plugin_namespace` attributes, and passes the other attributes as plugin fields.

to_plugin_ops (plugins on) rewrites, over the last axis only,
  LayerNormalization(x, gamma[, beta])     (axis -1 or rank-1; no Mean/InvStdDev outputs in use)
  RMSNormalization(x, gamma)               (opset 23)
  the decomposed RMSNorm / LayerNorm that fuse_layernorm recognises (below opset 23 it keeps RMSNorm decomposed)
into TrtglmResidualNorm(input, [residual], gamma, [beta]) -> (output, [residual_out]), domain "trtglm":
  - x = Add(a, b) of two same-shape tensors: inputs (a, b), has_residual=1, and the Add's output tensor (the
    residual stream, which other nodes read) becomes residual_out; the Add goes.
  - the norm's only reader is QuantizeLinear(scalar constant scale, int8 zero point 0): out_scale = scale and the
    plugin writes the QuantizeLinear's int8 output tensor; the QuantizeLinear goes.
It leaves alone (and logs why): another axis, non-constant gamma/beta, gamma/beta that are not [hidden], hidden
above MAX_HIDDEN, inputs that are not float32/float16/bfloat16.

from_plugin_ops is the ONNX-level fallback: every TrtglmResidualNorm back to standard ops (Add; LayerNormalization,
RMSNormalization from opset 23 or the decomposed form below; QuantizeLinear), writing the same output tensors, so
ONNX Runtime runs a plugin graph; that is how the surgery is verified on a CPU.

Rotary embeddings are mapped by plugin_rotary (TrtglmRotary), called from both functions here; plugin_graph holds
what the mappings share (domain, opset import, the fallback's emitter).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from trtglm.passes.fold_constants import annotate_shapes

# fuse_layernorm's matcher: one definition of "a decomposed norm" for both passes
from trtglm.passes.fuse_layernorm import match_norm
from trtglm.passes.match import constant_value, producer, single_consumer
from trtglm.passes.naming import node_name, tensor_name
from trtglm.passes.plugin_graph import (DOMAIN, FLOATS, PLUGIN_ATTRS, Emitter, Skip, drop_domain, import_domain,
                                        known_shape, last_dim, np_dtype, tensor_type)
from trtglm.passes.plugin_graph import dtype_name as _dtype
from trtglm.passes.plugin_rotary import rotary_from_plugin, rotary_to_plugin

if TYPE_CHECKING:
    from trtglm.passes import PassContext

OP = "TrtglmResidualNorm"
MAX_HIDDEN = 16384  # the catalog's limit for TrtglmResidualNorm ("hidden 1..16384")
KINDS = {"RMSNormalization": 0, "LayerNormalization": 1}
RMSNORM_OPSET, REDUCE_AXES_INPUT_OPSET, LAYERNORM_OPSET = 23, 18, 17


# --- to_plugin_ops -------------------------------------------------------------------------------------------


@dataclass
class _Norm:
    """A normalization to replace: what it is, what it reads, what it writes, which nodes go with it."""

    what: str  # for the log: "LayerNormalization", "decomposed RMSNormalization", ...
    kind: int  # the plugin's kind: 0 RMSNorm, 1 LayerNorm
    x: gs.Tensor
    eps: float
    nodes: list[gs.Node]
    out: gs.Tensor
    params: list[tuple[gs.Tensor | None, np.ndarray | None]]  # (gamma, [beta]) as (tensor, value); None: ones


def to_plugin_ops(graph: gs.Graph, ctx: PassContext) -> int:
    outputs = {id(t) for t in graph.outputs}
    used: set[int] = set()
    rewrites = 0
    if any(t.dtype is None or t.shape is None for t in graph.tensors().values() if isinstance(t, gs.Variable)):
        annotate_shapes(graph, ctx.log)  # a graph rewritten in memory may not know them; the matches read both
    for node in list(graph.nodes):
        if id(node) in used or node.op not in ("LayerNormalization", "RMSNormalization", "ReduceMean"):
            continue
        what = f"{node.op} '{node.name}'" if node.op != "ReduceMean" else f"norm at ReduceMean '{node.name}'"
        try:
            if node.op == "ReduceMean":
                match = match_norm(node, outputs)
                if match is None or any(id(n) in used for n in match.nodes):
                    continue
                norm = _Norm(f"decomposed {match.kind}", KINDS[match.kind], match.x, match.eps, match.nodes,
                             match.out, [(None, match.gamma)] + ([(None, match.beta)] if match.beta is not None
                                                                  else []))
            else:
                norm = _native(node, outputs)
            attrs = _rewrite(graph, norm, outputs)
        except Skip as why:
            ctx.log.append(f"to_plugin_ops: {what} kept: {why}")
            continue
        used.update(id(n) for n in norm.nodes)
        ctx.log.append(f"to_plugin_ops: {norm.what} '{node.name}' -> {OP} (kind {attrs['kind']}, has_residual "
                       f"{attrs['has_residual']}, has_beta {attrs['has_beta']}, out_scale {attrs['out_scale']:g})")
        rewrites += 1
    graph.cleanup()  # the nodes the norms replaced, before the rotary match reads consumers
    rewrites += rotary_to_plugin(graph, ctx)
    if rewrites:
        import_domain(graph)
    graph.cleanup().toposort()
    return rewrites


def _native(node: gs.Node, outputs: set[int]) -> _Norm:
    x = node.inputs[0]
    axis = int(node.attrs.get("axis", -1))
    if axis != -1 and (x.shape is None or axis != len(x.shape) - 1):
        raise Skip(f"axis {axis} is not the last axis (-1, or rank-1 of a known rank)")
    if any(not t.is_empty() and (t.outputs or id(t) in outputs) for t in node.outputs[1:]):
        raise Skip("its Mean/InvStdDev outputs are used")
    params = [(t, constant_value(t)) for t in node.inputs[1:] if not t.is_empty()]
    if any(value is None for _, value in params):
        raise Skip("gamma/beta are not constants")
    # stash_type is not checked: the plugin keeps its statistics in fp32, what the default (1) asks for
    return _Norm(node.op, KINDS[node.op], x, float(node.attrs.get("epsilon", 1e-5)), [node], node.outputs[0],
                 params)


def _rewrite(graph: gs.Graph, norm: _Norm, outputs: set[int]) -> dict:
    """Check `norm` (raise Skip), then replace it, and the residual Add / QuantizeLinear it absorbs, by one
    plugin node; return the node's attributes."""
    x, dtype = norm.x, _dtype(norm.x)
    if dtype not in FLOATS:
        raise Skip(f"input '{x.name}' has dtype {dtype}, the plugin takes {'/'.join(FLOATS)}")
    gamma = norm.params[0][1]
    hidden = last_dim(x) or last_dim(norm.out) or (int(gamma.shape[-1]) if gamma is not None and gamma.size > 1
                                                      else None)
    if hidden is None:
        raise Skip("hidden size unknown")
    if hidden > MAX_HIDDEN:
        raise Skip(f"hidden size {hidden} > {MAX_HIDDEN}, the plugin's limit")
    params, gone, out = [], list(norm.nodes), norm.out
    scale = _channel_scale(out, outputs, hidden, dtype)
    if scale is not None:  # a per-channel Mul after the norm (SmoothQuant's 1/s): folded into gamma and beta
        mul, factor = scale
        gone.append(mul)
        out = mul.outputs[0]
    for (tensor, value), what in zip(norm.params, ("gamma", "beta")):
        if value is None:  # a decomposed norm without a gamma Mul
            value = np.ones(hidden, dtype=np_dtype(x))
        if value.size != hidden or any(d != 1 for d in value.shape[:-1]):
            raise Skip(f"{what} has shape {list(value.shape)}, not [{hidden}]")
        if np.dtype(value.dtype).name != dtype:
            raise Skip(f"{what} is {np.dtype(value.dtype).name}, input '{x.name}' is {dtype}")
        if scale is not None:
            tensor, value = None, (value.reshape(hidden) * factor).astype(value.dtype)
        if tensor is None or list(tensor.shape or ()) != [hidden]:  # the plugin takes [hidden]
            tensor = gs.Constant(tensor_name(graph, f"{out.name}_{what}"), value.reshape(hidden))
        params.append(tensor)

    inputs, out_tensors = [x], [out]
    add = _residual_add(x)
    if add is not None:  # the Add's output stays, now written by the plugin: the residual stream reads it
        inputs, out_tensors = list(add.inputs), [out, x]
        gone.append(add)
    out_scale = 0.0
    quant = _int8_quantize(out, outputs)
    if quant is not None:
        out_scale = float(constant_value(quant.inputs[1]).reshape(-1)[0])
        out_tensors[0] = quant.outputs[0]
        gone.append(quant)

    for node in gone:  # detach first: a tensor has one producer, and the plugin is about to become it
        node.outputs.clear()
    attrs = {"kind": norm.kind, "eps": float(norm.eps), "has_residual": int(add is not None),
             "has_beta": int(len(params) > 1), "out_scale": out_scale,
             **PLUGIN_ATTRS}
    graph.nodes.append(gs.Node(OP, name=node_name(graph, f"{out_tensors[0].name}_{OP}"), domain=DOMAIN,
                               attrs=attrs, inputs=inputs + params, outputs=out_tensors))
    return attrs


def _channel_scale(out: gs.Tensor, outputs: set[int], hidden: int, dtype: str) -> tuple[gs.Node, np.ndarray] | None:
    """(Mul, factor [hidden]) when `out`'s only reader multiplies it by a constant per-channel vector (shape [hidden]
    or [1, ..., hidden]) of its dtype, and the product is no graph output; else None."""
    mul = single_consumer(out, outputs)
    if mul is None or mul.op != "Mul" or len(mul.inputs) != 2 or id(mul.outputs[0]) in outputs:
        return None
    other = mul.inputs[1] if mul.inputs[0] is out else mul.inputs[0]
    factor = constant_value(other)
    if factor is None or factor.size != hidden or any(d != 1 for d in factor.shape[:-1]) or \
            np.dtype(factor.dtype).name != dtype:
        return None
    return mul, factor.reshape(hidden)


def _residual_add(x: gs.Tensor) -> gs.Node | None:
    """The Add that makes `x` from two same-shape tensors (no broadcasting), else None. Other nodes may read x:
    it stays as the plugin's residual_out."""
    add = producer(x)
    if add is None or add.op != "Add" or len(add.inputs) != 2:
        return None
    a, b = add.inputs
    if not (known_shape(a) and b.shape is not None and list(a.shape) == list(b.shape)):
        return None
    return add if _dtype(a) == _dtype(b) == _dtype(x) else None


def _int8_quantize(out: gs.Tensor, outputs: set[int]) -> gs.Node | None:
    """`out`'s only reader when it is a per-tensor int8 QuantizeLinear with zero point 0, else None."""
    quant = single_consumer(out, outputs)
    if quant is None or quant.op != "QuantizeLinear" or quant.inputs[0] is not out:
        return None
    scale = constant_value(quant.inputs[1])
    if scale is None or scale.size != 1 or np.dtype(scale.dtype).name not in FLOATS:
        return None
    if not (np.isfinite(float(scale.reshape(-1)[0])) and float(scale.reshape(-1)[0]) > 0):
        return None
    if len(quant.inputs) > 2 and not quant.inputs[2].is_empty():
        zero = constant_value(quant.inputs[2])
        if zero is None or zero.dtype != np.int8 or zero.size != 1 or int(zero.reshape(-1)[0]) != 0:
            return None
    elif int(quant.attrs.get("output_dtype", onnx.TensorProto.UINT8)) != onnx.TensorProto.INT8:
        return None  # no zero point: uint8 (opset 21 may say int8 with output_dtype)
    return quant


# --- from_plugin_ops -----------------------------------------------------------------------------------------


def from_plugin_ops(graph: gs.Graph, ctx: PassContext) -> int:
    rewrites = 0
    for node in [n for n in graph.nodes if n.op == OP and n.domain == DOMAIN]:
        a = node.attrs
        has_residual, has_beta = int(a.get("has_residual", 0)), int(a.get("has_beta", 0))
        kind, eps, out_scale = int(a.get("kind", 0)), float(a.get("eps", 1e-5)), float(a.get("out_scale", 0.0))
        x, params = node.inputs[0], list(node.inputs[1 + has_residual:])
        out, residual_out = node.outputs[0], (node.outputs[1] if has_residual and len(node.outputs) > 1 else None)
        node.outputs.clear()
        new = Emitter(graph, node.name, x)
        if has_residual:
            x = new.op("Add", [x, node.inputs[1]], residual_out or new.var("residual_out"))
        y = new.var("norm") if out_scale > 0 else out
        if kind == 1 and ctx.opset >= LAYERNORM_OPSET:
            new.op("LayerNormalization", [x] + params[:1 + has_beta], y, axis=-1, epsilon=eps)
        elif kind == 0 and ctx.opset >= RMSNORM_OPSET:
            new.op("RMSNormalization", [x, params[0]], y, axis=-1, epsilon=eps)
        else:
            _emit_decomposed(new, x, params[0], params[1] if kind == 1 and has_beta else None, kind, eps, y,
                             ctx.opset)
        if out_scale > 0:
            new.op("QuantizeLinear", [y, new.const("scale", out_scale), new.const("zero_point", 0, np.int8)], out)
        ctx.log.append(f"from_plugin_ops: {OP} '{node.name}' -> {', '.join(n.op for n in new.nodes)}")
        rewrites += 1
    rewrites += rotary_from_plugin(graph, ctx)
    graph.cleanup().toposort()
    drop_domain(graph)
    return rewrites


def _emit_decomposed(new: Emitter, x, gamma, beta, kind: int, eps: float, y, opset: int) -> None:
    """[d = x - mean(x)]; y = d * 1/sqrt(mean(d*d) + eps) * gamma [+ beta]: the form fuse_layernorm matches.
    A float16/bfloat16 input is normalized in float32 and cast back once, as the plugin computes it (a sum of
    squares in FP16 overflows past |x| = 256)."""
    out = y
    if _dtype(x) != "float32":
        new = new.in_float32()
        x, gamma, beta = (None if t is None else new.op("Cast", [t], to=onnx.TensorProto.FLOAT)
                          for t in (x, gamma, beta))
        y = new.var("normalized")

    def mean(t):
        if opset >= REDUCE_AXES_INPUT_OPSET:
            return new.op("ReduceMean", [t, new.const("axes", [-1], np.int64)], keepdims=1)
        return new.op("ReduceMean", [t], axes=[-1], keepdims=1)

    d = new.op("Sub", [x, mean(x)]) if kind == 1 else x
    variance = mean(new.op("Mul", [d, d]))
    inv = new.op("Reciprocal", [new.op("Sqrt", [new.op("Add", [variance, new.const("eps", eps)])])])
    scaled = new.op("Mul", [d, inv])
    if beta is None:
        new.op("Mul", [scaled, gamma], y)
    else:
        new.op("Add", [new.op("Mul", [scaled, gamma]), beta], y)
    if y is not out:
        new.op("Cast", [y], out, to=tensor_type(out))