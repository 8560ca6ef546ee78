"""Convert the float part of a graph (FP32, or FP32 with INT8 Q/DQ) to FP16, keeping the numerically fragile ops
in FP32.

Why: TensorRT 11 builds every network strongly typed: there is no FP16 builder flag, each layer runs in the
precision of its ONNX tensor types. So `--fp16` has to write an ONNX graph whose tensors are FP16. Not all of
them: FP16's largest value is 65504, and sums of squares, exponentials and long sums overflow it (or lose the
small addends), so reductions, Softmax/LogSoftmax, Pow and Exp stay FP32 behind Casts; so do Range and CumSum
(position arithmetic: FP16 holds integers exactly only up to 2048) and float "shape math" (float tensors that
only feed a Cast to an integer type or a Range). Cos and Sin stay FP32 with the "angle math" before them (float
tensors that only reach Cos/Sin): a rotary embedding's angle is position x frequency, and at position 2000
FP16's step is 1 radian, so cos/sin computed from an FP16 angle are wrong by up to 0.5 from there on; the tables
(in [-1, 1]) then go FP16 where Q and K read them. LayerNormalization/RMSNormalization take FP16 in and out with
stash_type=1, and opset-23 Attention gets softmax_precision=1: TensorRT's normalization and attention kernels
then reduce in FP32 inside one fused kernel, with no Casts that would break the fusion.

Rules:
- every other node with float tensors runs in FP16, where its ONNX schema allows float16 for that input or
  output (Resize `scales` and the Mean/InvStdDev outputs of LayerNormalization stay FP32, and opset < 19
  QuantizeLinear/DequantizeLinear accept only FP32 scales, so there Q/DQ stay FP32 with a Cast after DQ);
- elementwise and data-movement ops whose variable float inputs all come out of FP32 nodes stay FP32 too (the
  NaN guard after a Softmax, the pooling arithmetic after a ReduceSum): no Cast-to-FP16-and-back ping-pong;
- Cast/Constant/ConstantOfShape produce FP32 when all their consumers want FP32, else FP16 (their `to`/`value`
  attribute is rewritten); EyeLike and Random* keep FP32 (dtype attribute unchanged) with a Cast where used;
- Erf (GELU) runs in FP16: it is bounded, and on MiniLM keeping it FP32 changed the embedding cosine by < 1e-7
  while costing two Casts per layer around TensorRT's GELU fusion;
- graph inputs and outputs keep their FP32 type through Casts at the boundary (the I/O contract is unchanged);
  integer tensors (Q/DQ int8 data and zero points, ids, shapes) are never touched; DQ scales become FP16 with
  the DQ output, so the weights TensorRT dequantizes come out FP16;
- a constant goes FP16 when its consumers want it; finite values beyond +-65504 are clipped to +-65504 and
  nonzero values below FP16's smallest subnormal (~6e-8) flush to 0: both are logged per constant. Clipping,
  not -inf, is right for attention masks built from finfo(float32).min: exporters build masks arithmetically
  ((1 - m) * min, min * 0 must be 0, and -inf * 0 is NaN), and a fully masked Softmax row of -inf is NaN where
  the FP32 model gives a uniform row; -65504 still puts exp() of a masked score at exactly 0 in FP32 Softmax.
  (The FP16 Add of mask and scores can still round below -65504 to -inf: harmless unless a row is fully masked.)

A graph without FP32 tensors is left alone, so the pass is idempotent. Subgraphs (If/Loop/Scan) are refused.
"""

from __future__ import annotations

from collections import defaultdict
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from trtglm.errors import ModelError
from trtglm.passes.fold_constants import annotate_shapes
from trtglm.passes.naming import node_name, tensor_name

if TYPE_CHECKING:
    from trtglm.passes import PassContext

FP16_MAX = float(np.finfo(np.float16).max)  # 65504
FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
F32, F16 = np.dtype(np.float32), np.dtype(np.float16)
DEFAULT_DOMAINS = ("", "ai.onnx")

KEEP_FP32 = frozenset({
    "ReduceSum", "ReduceMean", "ReduceL2", "ReduceSumSquare", "ReduceLogSumExp", "ReduceLogSum", "ReduceProd",
    "Softmax", "LogSoftmax", "Pow", "Exp", "Range", "CumSum",
    # angles (rotary embedding: position x frequency reaches thousands of radians; FP16's step at 2048 is 2)
    "Cos", "Sin",
    # exact (0/1) or random values: nothing to gain in FP16, and ONNX Runtime has no FP16 kernel for them
    "EyeLike", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Bernoulli",
})
# Cheap elementwise / data-movement ops: they stay in FP32 when all their variable float inputs are FP32.
FOLLOW = frozenset({
    "Add", "Sub", "Mul", "Div", "Neg", "Abs", "Sqrt", "Reciprocal", "Max", "Min", "Clip", "Relu", "Where", "Floor",
    "Ceil", "Round", "Expand", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Flatten", "Concat", "Slice",
    "Split", "Gather", "Tile", "Identity", "IsNaN", "IsInf", "Equal", "Less", "Greater", "LessOrEqual",
    "GreaterOrEqual",
})
ANGLE_SINKS = frozenset({"Cos", "Sin"})
# Ops whose float output type comes from an attribute: their precision follows their consumers.
SOURCES = frozenset({"Cast", "Constant", "ConstantOfShape"})
ANY_INPUT = ("Cast", "Shape", "Size")  # read any input type: never given an input Cast


def convert_fp16(graph: gs.Graph, ctx: PassContext) -> int:
    _refuse_subgraphs(graph)
    annotate_shapes(graph, ctx.log)
    if not any(_dtype(t) == F32 for t in graph.tensors().values()):
        ctx.log.append("convert_fp16: no FP32 tensor; graph left as is")
        return 0
    _require_dtypes(graph)
    fp16 = _precisions(graph, ctx.opset)
    count = _convert_outputs(graph, fp16, ctx) + _convert_inputs(graph, fp16, ctx)
    kept = sorted({n.op for n in graph.nodes if fp16.get(id(n)) is False and n.op in KEEP_FP32})
    ctx.log.append(f"convert_fp16: {count} tensors to FP16; kept FP32: {', '.join(kept) or 'none'}")
    graph.cleanup().toposort()
    return count


# --- deciding precisions -------------------------------------------------------------------------------------


def _precisions(graph: gs.Graph, opset: int) -> dict[int, bool]:
    """id(node) -> True when the node runs in FP16, False for FP32; nodes without float tensors are absent."""
    graph.toposort()
    outputs = {id(t) for t in graph.outputs}
    fp32_math = _shape_math(graph, outputs) | _angle_math(graph, outputs)
    fp16: dict[int, bool] = {}
    fp32_made: set[int] = set()  # float tensors made by FP32 nodes
    for node in graph.nodes:
        floats = _float_outputs(node) if node.op in ANY_INPUT else _float_inputs(node) + _float_outputs(node)
        if not floats or node.op in SOURCES:
            continue
        variables = [t for t in _float_inputs(node) if isinstance(t, gs.Variable)]
        keep = (node.op in KEEP_FP32 or (node.domain or "") not in DEFAULT_DOMAINS or _schema(node.op, opset) is None
                or (_float_outputs(node) and all(id(t) in fp32_math for t in _float_outputs(node)))
                or (node.op in FOLLOW and variables and all(id(t) in fp32_made for t in variables)))
        fp16[id(node)] = not keep
        if keep:
            fp32_made.update(id(t) for t in _float_outputs(node))
    for node in reversed(graph.nodes):  # sources: FP32 only when every consumer wants FP32
        if node.op in SOURCES and _float_outputs(node):
            wants_fp32 = all(id(t) in outputs or all(c.op in ANY_INPUT or fp16.get(id(c)) is False for c in t.outputs)
                             for t in _float_outputs(node))
            fp16[id(node)] = not wants_fp32
    return fp16


def _shape_math(graph: gs.Graph, outputs: set[int]) -> set[int]:
    """ids of float tensors whose values only reach integer Casts or Range through elementwise ops."""
    def sink(node: gs.Node) -> bool:
        if node.op == "Cast":
            return int(node.attrs.get("to", FLOAT)) not in (FLOAT, FLOAT16)
        return node.op == "Range"

    return _only_reaching(graph, outputs, sink, FOLLOW)


def _angle_math(graph: gs.Graph, outputs: set[int]) -> set[int]:
    """ids of float tensors whose values only reach Cos/Sin (rotary angles: position x frequency) through
    elementwise ops or a MatMul (HF Llama builds the angles as an outer product)."""
    return _only_reaching(graph, outputs, lambda node: node.op in ANGLE_SINKS, FOLLOW | {"MatMul"})


def _only_reaching(graph: gs.Graph, outputs: set[int], sink, through: frozenset) -> set[int]:
    """ids of float tensors (no graph outputs) all of whose readers are sinks, or `through` ops whose float
    outputs are all such tensors."""
    found: set[int] = set()

    def reader_ok(node: gs.Node) -> bool:
        return sink(node) or (node.op in through and all(id(t) in found for t in _float_outputs(node)))

    for node in reversed(graph.nodes):
        for t in _float_outputs(node):
            if t.outputs and id(t) not in outputs and all(reader_ok(c) for c in t.outputs):
                found.add(id(t))
    return found


# --- rewriting -----------------------------------------------------------------------------------------------


def _convert_outputs(graph: gs.Graph, fp16: dict[int, bool], ctx: PassContext) -> int:
    """FP16 nodes write FP16 (attributes set to match); graph outputs keep FP32 through a Cast."""
    outputs = {id(t) for t in graph.outputs}
    count = 0
    for node in list(graph.nodes):
        if not fp16.get(id(node)):
            continue
        schema = _schema(node.op, ctx.opset)
        slots = [i for i, t in enumerate(node.outputs) if _dtype(t) == F32 and _allows_fp16(schema, i, True)]
        if slots:
            _set_fp16_attrs(node, ctx)
        for i in slots:
            out = node.outputs[i]
            count += 1
            if id(out) not in outputs:
                out.dtype = F16
                continue
            twin = gs.Variable(tensor_name(graph, f"{out.name}_fp16"), dtype=F16, shape=out.shape)
            for consumer in list(out.outputs):
                for j, t in enumerate(consumer.inputs):
                    if t is out:
                        consumer.inputs[j] = twin
            node.outputs[i] = twin
            graph.nodes.append(gs.Node("Cast", node_name(graph, f"{out.name}_to_fp32"), attrs={"to": FLOAT},
                                       inputs=[twin], outputs=[out]))
    return count


def _convert_inputs(graph: gs.Graph, fp16: dict[int, bool], ctx: PassContext) -> int:
    """Give every node input the type its precision wants: converted constants, shared Casts for variables."""
    uses: dict[int, list[tuple[gs.Node, int, np.dtype]]] = defaultdict(list)
    constants: dict[int, gs.Constant] = {}
    casts: dict[tuple[int, np.dtype], gs.Variable] = {}
    for node in list(graph.nodes):
        if id(node) not in fp16 or node.op in ANY_INPUT:
            continue
        schema = _schema(node.op, ctx.opset)
        for i, t in enumerate(node.inputs):
            have = _dtype(t)
            if have not in (F32, F16):
                continue
            want = F16 if fp16[id(node)] and _allows_fp16(schema, i, False) else F32
            if isinstance(t, gs.Constant):
                uses[id(t)].append((node, i, want))
                constants[id(t)] = t
            elif have != want:
                if (id(t), want) not in casts:
                    casts[id(t), want] = _cast(graph, t, want)
                node.inputs[i] = casts[id(t), want]
    count = 0
    for key, const in constants.items():
        wants = {want for _, _, want in uses[key]}
        if wants == {const.dtype}:
            continue
        if len(wants) == 1:  # every consumer wants the other type: convert in place, keep the name
            const.values = _converted(const, wants.pop(), ctx)
            count += int(const.dtype == F16)
            continue
        other = F16 if const.dtype == F32 else F32
        copy = gs.Constant(tensor_name(graph, f"{const.name}_{'fp16' if other == F16 else 'fp32'}"),
                           _converted(const, other, ctx))
        count += int(other == F16)
        for node, i, want in uses[key]:
            if want == other:
                node.inputs[i] = copy
    return count


def _cast(graph: gs.Graph, tensor: gs.Variable, dtype: np.dtype) -> gs.Variable:
    suffix = "fp16" if dtype == F16 else "fp32"
    out = gs.Variable(tensor_name(graph, f"{tensor.name}_{suffix}"), dtype=dtype, shape=tensor.shape)
    graph.nodes.append(gs.Node("Cast", node_name(graph, f"{tensor.name}_to_{suffix}"),
                               attrs={"to": FLOAT16 if dtype == F16 else FLOAT}, inputs=[tensor], outputs=[out]))
    return out


def _set_fp16_attrs(node: gs.Node, ctx: PassContext) -> None:
    """Attributes that carry a float type or precision, for a node whose float outputs become FP16."""
    if node.op == "Cast":
        node.attrs["to"] = FLOAT16
    elif node.op in ("Constant", "ConstantOfShape"):
        value = node.attrs.get("value")
        if node.op == "Constant" and "value_float" in node.attrs:
            value = gs.Constant(f"{node.name}_value", np.array(node.attrs.pop("value_float"), np.float32))
        elif node.op == "Constant" and "value_floats" in node.attrs:
            value = gs.Constant(f"{node.name}_value", np.array(node.attrs.pop("value_floats"), np.float32))
        elif value is None:  # ConstantOfShape without value: a float32 zero
            value = gs.Constant(f"{node.name}_value", np.zeros(1, np.float32))
        node.attrs["value"] = gs.Constant(value.name, _converted(value, F16, ctx))
    elif node.op in ("LayerNormalization", "RMSNormalization"):
        node.attrs["stash_type"] = 1  # mean and variance in FP32
    elif node.op == "Attention":
        node.attrs["softmax_precision"] = FLOAT


def _converted(const: gs.Constant, dtype: np.dtype, ctx: PassContext) -> np.ndarray:
    """`const`'s values as `dtype`; to FP16, finite values beyond the range are clipped and both clipping and
    flush to zero are logged."""
    values = np.asarray(const.values)
    if dtype == F32:
        return values.astype(np.float32)
    over = np.isfinite(values) & (np.abs(values) > FP16_MAX)
    half = np.where(over, np.sign(values) * FP16_MAX, values).astype(np.float16)
    flushed = int(np.count_nonzero((values != 0) & (half == 0)))
    if over.any():
        ctx.log.append(f"convert_fp16: '{const.name}': {int(over.sum())} value(s) beyond +-65504 clipped to "
                       f"+-65504 (e.g. an attention mask's finfo(float32).min)")
    if flushed:
        ctx.log.append(f"convert_fp16: '{const.name}': {flushed} nonzero value(s) below FP16's smallest "
                       f"subnormal flush to 0")
    return half


# --- helpers -------------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _schema(op: str, opset: int) -> onnx.defs.OpSchema | None:
    try:
        return onnx.defs.get_schema(op, opset, "")
    except onnx.defs.SchemaError:
        return None


def _allows_fp16(schema: onnx.defs.OpSchema | None, index: int, output: bool) -> bool:
    """Whether input/output `index` of an op may be float16 according to its ONNX schema."""
    params = (schema.outputs if output else schema.inputs) if schema is not None else []
    if not params:
        return False
    param = params[min(index, len(params) - 1)]
    if index >= len(params) and param.option != onnx.defs.OpSchema.FormalParameterOption.Variadic:
        return False
    allowed = next((c.allowed_type_strs for c in schema.type_constraints if c.type_param_str == param.type_str),
                   [param.type_str])
    return "tensor(float16)" in allowed


def _dtype(tensor: gs.Tensor) -> np.dtype | None:
    return None if tensor.dtype is None or tensor.is_empty() else np.dtype(tensor.dtype)


def _float_inputs(node: gs.Node) -> list[gs.Tensor]:
    return [t for t in node.inputs if _dtype(t) in (F32, F16)]


def _float_outputs(node: gs.Node) -> list[gs.Tensor]:
    return [t for t in node.outputs if _dtype(t) in (F32, F16)]


def _refuse_subgraphs(graph: gs.Graph) -> None:
    for node in graph.nodes:
        if any(isinstance(v, gs.Graph) for v in node.attrs.values()):
            raise ModelError(f"convert_fp16: node '{node.name}' ({node.op}) has a subgraph; FP16 conversion of "
                             f"control flow is not supported: inline or fold it first, or build without --fp16")


def _require_dtypes(graph: gs.Graph) -> None:
    for node in graph.nodes:
        for t in node.outputs:
            if not t.is_empty() and t.dtype is None:
                raise ModelError(f"convert_fp16: tensor '{t.name}' (output of {node.op} node '{node.name}') has no "
                                 f"known element type, so its precision cannot be chosen; give the model value_info "
                                 f"for it or make it shape-inferable")
