"""Q/DQ placement and insertion, following TensorRT's explicit-quantization rules.

Why: TensorRT 11 takes INT8 only from QuantizeLinear/DequantizeLinear pairs, and it fuses them into the
layers around them by fixed patterns. Placement decides which kernels it can pick:
- every input of Conv, ConvTranspose, Gemm and MatMul is quantized: weights per output channel (int8
  initializer + DequantizeLinear), activations per tensor; symmetric, zero point 0; by the precision policy,
  attention BMMs (a MatMul of two activations) and GEMV-shaped MatMuls stay float unless asked for;
- nothing sits between a Conv and its activation: Q/DQ go on *consumer inputs*, never on a Conv's output,
  so Conv+bias+Relu/Clip stays one fused kernel;
- in a skip connection Add(Conv(x), y) the residual input y is quantized, so TensorRT fuses the Add into the
  Conv as an INT8 residual (a Conv with an unquantized output feeding the Add is the one it fuses); only while
  that Conv runs INT8: next to a Conv kept in float, y's Q/DQ would buy no fusion and only add rounding error;
- graph outputs are never quantized, and one Q/DQ pair per tensor is shared by all of its consumers;
- a tensor that is non-negative by construction (ReLU, Clip at 0, ReLU6, and pooling/padding/reshaping of those)
  and read only by Conv/Gemm layers goes on the *unsigned grid*: TensorRT's INT8 is symmetric, so a ReLU output
  would use only 0..127. Quantizing x - amax/2 instead uses -127..127 (twice the resolution, a quarter of the noise
  power), and Conv(x) = Conv(x - c) + c * sum(W) puts the shift back through the consumer's bias, computed with
  the dequantized weights so that the INT8 layer equals W_q (x_q) + b exactly. The Sub goes in front of a zero
  Pad (which then pads with -c), so that it is a pointwise op right after the producing convolution's ReLU, which
  TensorRT fuses into that kernel's epilogue (its documented pointwise fusion; not measured here). Consumers with
  implicit zero padding (a Conv `pads` attribute) would pad x - c with 0, so their inputs stay signed, unless
  passes/explicit_pads.py (`--explicit-pads`) has turned that padding into a Pad;
- tensors that are not numerically activations stay float: integer and shape tensors, tensors computed only
  from integer inputs (a mask cast to float), and additive attention masks feeding a Softmax.

`plan_qdq` runs before calibration (it says which activations to observe); `insert_qdq` applies the plan
with the calibrated scales.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from trtglm.calib.methods import activation_grid
from trtglm.config import PrecisionPolicy
from trtglm.passes.match import non_negative, pad_value

QUANTIZED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
CONV_OPS = ("Conv", "ConvTranspose")
FLOAT_TYPES = (np.float32, np.float16)
LOOKUP_OPS = ("Gather", "GatherElements", "GatherND")  # an embedding table indexed by token ids


@dataclass
class QdqPlan:
    """Which tensors get Q/DQ. Activation names are sorted for deterministic output."""

    activations: list[str] = field(default_factory=list)  # per-tensor, calibrated
    weights: dict[str, int] = field(default_factory=dict)  # constant name -> channel axis (-1: per-tensor)
    weight_ops: dict[str, str] = field(default_factory=dict)  # constant name -> op type of its consumer
    skipped: dict[str, str] = field(default_factory=dict)  # node name -> why it stays float
    residual_adds: list[str] = field(default_factory=list)  # Add nodes whose residual input is quantized
    unsigned: list[str] = field(default_factory=list)  # activations on the unsigned grid (a subset, sorted)
    signed: dict[str, str] = field(default_factory=dict)  # non-negative activations left signed -> why


def plan_qdq(graph: gs.Graph, policy: PrecisionPolicy = PrecisionPolicy()) -> QdqPlan:
    plan = QdqPlan()
    float_acts = _activation_tensors(graph)  # toposorts the graph
    order = {id(node): i for i, node in enumerate(graph.nodes)}
    activations: set[str] = set()
    for node in graph.nodes:
        if node.op not in QUANTIZED_OPS and node.op != "Add":
            continue
        if _excluded(node, policy.exclude):
            plan.skipped[node.name] = "excluded by --exclude"
            continue
        if node.name in policy.keep_float:
            plan.skipped[node.name] = "kept in float (accuracy budget or --quant-config)"
            continue
        why_float = _policy_keeps_float(node, policy)
        if why_float:
            plan.skipped[node.name] = why_float
            continue
        if node.op == "Add":
            residual = _residual_input(node, float_acts, order, plan.skipped)
            if residual is not None:
                activations.add(residual.name)
                plan.residual_adds.append(node.name)
            continue
        inputs = node.inputs[:2]  # a bias (input 2) stays float
        odd = [t for t in inputs if not (isinstance(t, gs.Constant) and _is_float(t)) and t.name not in float_acts]
        if odd:  # quantizing only some inputs would not give TensorRT an INT8 kernel
            plan.skipped[node.name] = f"input '{odd[0].name}' is not a float activation"
            continue
        for idx, tensor in enumerate(inputs):
            if isinstance(tensor, gs.Constant):
                plan.weights[tensor.name] = _weight_axis(node, idx, tensor)
                plan.weight_ops[tensor.name] = node.op
            else:
                activations.add(tensor.name)
    plan.activations = sorted(activations)
    plan.residual_adds.sort()
    if policy.unsigned:
        tensors = graph.tensors()
        for name in plan.activations:
            if non_negative(tensors[name]):
                why = _why_not_shiftable(tensors[name], plan)
                if why:
                    plan.signed[name] = why
                else:
                    plan.unsigned.append(name)
    return plan


def insert_qdq(graph: gs.Graph, plan: QdqPlan, amax: dict[str, float], seven_bit_ops: tuple[str, ...] = (),
               integer_weights: dict | None = None, biases: dict | None = None) -> int:
    """Insert the planned Q/DQ pairs; `amax` maps activation names to calibrated ranges.

    Weights are stored as int8 with a DequantizeLinear in front (TensorRT folds it). Weights of the op types in
    `seven_bit_ops` are limited to [-63, 63]: ONNX Runtime's u8*s8 GEMM kernels on x86 CPUs without VNNI add
    pairs of products in saturating int16, which 7-bit weights cannot overflow. `integer_weights` (weight name
    -> (int8 values, per-channel scales)) replaces round-to-nearest where given, and `biases` (node name -> float
    bias) replaces the bias of each node whose weight is quantized (calib/weight_quant.py decides both). Returns
    the number of tensors quantized.
    """
    tensors = graph.tensors()
    count = 0
    shifted: list[tuple[gs.Node, np.float32]] = []  # consumers of unsigned tensors and their shifts
    unsigned = set(plan.unsigned)
    for name in plan.activations:
        if name not in amax:
            continue  # no statistics (e.g. a calibration cache without this tensor): stays float
        count += _quantize_activation(graph, tensors[name], float(amax[name]), plan.skipped, name in unsigned, shifted)
    for name in sorted(plan.weights):
        bits = 7 if plan.weight_ops.get(name) in seven_bit_ops else 8
        given = (integer_weights or {}).get(name)
        count += _quantize_weight(graph, tensors[name], plan.weights[name], bits, plan.skipped, given)
    for node in graph.nodes:
        if node.name in (biases or {}) and len(node.inputs) > 1 and _dequantized(node.inputs[1]):
            _set_bias(node, biases[node.name])
    for node, centre in shifted:
        _set_bias(node, _bias_of(node) + np.float64(centre) * _dequantized_row_sums(node), "shifted")
    graph.cleanup().toposort()
    return count


# --- placement helpers -----------------------------------------------------------------------------


def _policy_keeps_float(node: gs.Node, policy: PrecisionPolicy) -> str | None:
    if node.op != "MatMul":
        return None
    a, b = node.inputs[:2]
    if isinstance(a, gs.Variable) and isinstance(b, gs.Variable) and not policy.int8_attention:
        return "attention BMM (two activations) kept in float; --int8-attention quantizes it"
    act = a if isinstance(a, gs.Variable) else b
    if act.shape is not None and (len(act.shape) < 2 or act.shape[-2] == 1):
        return "GEMV-shaped MatMul (one row): INT8 gains nothing there"
    return None


def _excluded(node: gs.Node, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(node.name, p) or fnmatch.fnmatchcase(node.op, p) for p in patterns)


def _is_float(tensor: gs.Tensor) -> bool:
    dtype = tensor.values.dtype if isinstance(tensor, gs.Constant) else tensor.dtype
    try:
        return np.dtype(dtype).type in FLOAT_TYPES
    except TypeError:
        return False


def _activation_tensors(graph: gs.Graph) -> set[str]:
    """Float variables that carry data: derived from a float graph input or looked up in a float table by
    data-dependent indices (an embedding), not from integers or constants alone (a mask cast to float), and
    not an additive mask feeding a Softmax."""
    data: set[str] = {t.name for t in graph.inputs if _is_float(t)}
    graph.toposort()
    for node in graph.nodes:
        if node.op in ("Shape", "Size"):
            continue
        lookup = node.op in LOOKUP_OPS and isinstance(node.inputs[0], gs.Constant) and _is_float(node.inputs[0])
        if lookup or any(isinstance(t, gs.Variable) and t.name in data for t in node.inputs):
            data.update(t.name for t in node.outputs if _is_float(t))
    return {name for name in data if name not in _additive_masks(graph)}


def _additive_masks(graph: gs.Graph) -> set[str]:
    """Inputs of the Add/Where chain in front of a Softmax that do not come from a MatMul (the scores)."""
    masks: set[str] = set()
    for node in graph.nodes:
        if node.op != "Softmax":
            continue
        frontier = [node.inputs[0]]
        while frontier:
            tensor = frontier.pop()
            producer = tensor.inputs[0] if tensor.inputs else None
            if producer is None or producer.op not in ("Add", "Where"):
                continue
            for inp in producer.inputs:
                if isinstance(inp, gs.Variable) and not _has_matmul_ancestor(inp):
                    masks.add(inp.name)
                else:
                    frontier.append(inp)
    return masks


def _has_matmul_ancestor(tensor: gs.Tensor, depth: int = 8) -> bool:
    stack, seen = [(tensor, 0)], set()
    while stack:
        t, d = stack.pop()
        if t.name in seen or d > depth or not t.inputs:
            continue
        seen.add(t.name)
        node = t.inputs[0]
        if node.op in ("MatMul", "Gemm", "Einsum"):
            return True
        stack.extend((i, d + 1) for i in node.inputs if isinstance(i, gs.Variable))
    return False


def _residual_input(add: gs.Node, float_acts: set[str], order: dict[int, int],
                    skipped: dict[str, str]) -> gs.Variable | None:
    """For Add(Conv(x), y) return y; with two Conv inputs, the later Conv is fused and the other quantized. None
    when the Conv it would fuse into is `skipped` (kept in float)."""
    inputs = [t for t in add.inputs if isinstance(t, gs.Variable)]
    if len(inputs) != 2 or any(t.name not in float_acts for t in inputs):
        return None
    if any(t.shape is not None and o.shape is not None and len(t.shape) != len(o.shape)
           for t, o in zip(inputs, reversed(inputs))):
        return None  # a broadcast bias-like Add, not a skip connection
    fusable = [t for t in inputs if t.inputs and t.inputs[0].op in CONV_OPS and len(t.outputs) == 1]
    if not fusable:
        return None
    fused = max(fusable, key=lambda t: order[id(t.inputs[0])])
    if fused.inputs[0].name in skipped:
        return None
    return inputs[1] if inputs[0] is fused else inputs[0]


def _why_not_shiftable(tensor: gs.Variable, plan: QdqPlan) -> str | None:
    """None when every node that will read the dequantized tensor can take the shift in its bias: a Conv without
    implicit padding or a plain Gemm (alpha = beta = 1, a per-output bias), reading it as data with planned
    weights; else why not, naming the first reader that cannot."""
    for node in tensor.outputs:
        if node.name not in plan.skipped:
            why = _why_no_shift(node, tensor, plan)
            if why:
                return f"read by {node.op} '{node.name}', {why}"
    return None


def _why_no_shift(node: gs.Node, tensor: gs.Variable, plan: QdqPlan) -> str | None:
    if node.op not in ("Conv", "Gemm") or len(node.inputs) < 2 or node.inputs[0] is not tensor \
            or node.inputs[1].name not in plan.weights:
        return "which cannot take the shift in a bias"
    bias = node.inputs[2] if len(node.inputs) > 2 and not node.inputs[2].is_empty() else None
    if bias is not None and not isinstance(bias, gs.Constant):
        return "whose bias is computed"
    if node.op == "Conv":
        pads = node.attrs.get("pads", [0])
        if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID") or any(pads):
            return "which pads implicitly (its zeros would stand for x = amax/2)"
        return None
    out = node.inputs[1].values.shape[0 if node.attrs.get("transB", 0) else 1]
    if node.attrs.get("transA", 0) or float(node.attrs.get("alpha", 1.0)) != 1.0 \
            or float(node.attrs.get("beta", 1.0)) != 1.0 or (bias is not None and bias.values.size != out):
        return "with transA, alpha or beta, or a broadcast bias"
    return None


def _weight_axis(node: gs.Node, idx: int, tensor: gs.Constant) -> int:
    """The output-channel axis of a constant input, or -1 for per-tensor."""
    rank = tensor.values.ndim
    if node.op == "Conv" and idx == 1:
        return 0
    if node.op == "ConvTranspose" and idx == 1:
        return 1 if int(node.attrs.get("group", 1)) == 1 else -1
    if node.op == "Gemm" and idx == 1:
        return 0 if int(node.attrs.get("transB", 0)) else 1
    if node.op == "MatMul" and idx == 1 and rank >= 2:
        return rank - 1
    return -1


# --- insertion helpers -----------------------------------------------------------------------------


def _scale_const(name: str, value) -> gs.Constant:
    return gs.Constant(name, np.asarray(value, dtype=np.float32))


def _zero_point(name: str, size: int | None) -> gs.Constant:
    return gs.Constant(name, np.zeros(size, dtype=np.int8) if size else np.array(0, dtype=np.int8))


def _quantize_activation(graph: gs.Graph, tensor: gs.Variable, amax: float, keep_float, unsigned: bool = False,
                         shifted: list | None = None) -> int:
    """One Q/DQ pair for the tensor, read by every consumer except the nodes kept in float. On the unsigned grid
    the pair quantizes tensor - centre, and the consumers are appended to `shifted` for their bias."""
    consumers = [n for n in tensor.outputs if n.op != "QuantizeLinear" and n.name not in keep_float]
    if not consumers:
        return 0
    step, centre = activation_grid(amax, unsigned)
    scale = _scale_const(f"{tensor.name}_scale", step)
    zp = _zero_point(f"{tensor.name}_zero_point", None)
    q_out = gs.Variable(f"{tensor.name}_quantized", dtype=np.int8, shape=tensor.shape)
    dq_out = gs.Variable(f"{tensor.name}_dequantized", dtype=tensor.dtype, shape=tensor.shape)
    source = _centred(graph, tensor, centre, consumers) if unsigned else tensor
    if unsigned and shifted is not None:
        shifted.extend((n, centre) for n in consumers)
    graph.nodes.append(gs.Node("QuantizeLinear", f"{tensor.name}_QuantizeLinear", inputs=[source, scale, zp],
                               outputs=[q_out]))
    graph.nodes.append(gs.Node("DequantizeLinear", f"{tensor.name}_DequantizeLinear", inputs=[q_out, scale, zp],
                               outputs=[dq_out]))
    for node in consumers:
        _replace_input(node, tensor, dq_out)
    return 1


def _centred(graph: gs.Graph, tensor: gs.Variable, centre: np.float32, consumers: list[gs.Node]) -> gs.Variable:
    """tensor - centre. When the tensor is a zero Pad's output that only `consumers` read, and the Pad's input
    only feeds the Pad, the Sub goes in front of the Pad (padding with -centre): the ReLU, the Sub and the
    convolution before it become one kernel in TensorRT."""
    pad = tensor.inputs[0] if tensor.inputs else None
    data = pad.inputs[0] if pad is not None and pad.op == "Pad" else None
    before_pad = (data is not None and isinstance(data, gs.Variable) and pad_value(pad) == 0.0
                  and len(data.outputs) == 1 and all(t is not data and t is not tensor for t in graph.outputs)
                  and all(any(n is c for c in consumers) for n in tensor.outputs))
    source = data if before_pad else tensor
    centred = gs.Variable(f"{source.name}_centred", dtype=source.dtype, shape=source.shape)
    graph.nodes.append(gs.Node("Sub", f"{source.name}_centre",
                               inputs=[source, _scale_const(f"{source.name}_centre", centre)], outputs=[centred]))
    if not before_pad:
        return centred
    pad.inputs[0] = centred
    while len(pad.inputs) < 3:
        pad.inputs.append(gs.Variable.empty())
    pad.inputs[2] = _scale_const(f"{tensor.name}_pad_value", -centre)
    return tensor  # the Pad's output is now centred itself


def _quantize_weight(graph: gs.Graph, tensor: gs.Constant, axis: int, bits: int, keep_float,
                     given: tuple[np.ndarray, np.ndarray] | None = None) -> int:
    weights = np.asarray(tensor.values, dtype=np.float32)
    qmax = float(2 ** (bits - 1) - 1)
    if given is not None:
        q, scale = given
    else:
        q, scale = _nearest(weights, axis, qmax)
    q_const = gs.Constant(f"{tensor.name}_int8", q)
    dq_out = gs.Variable(f"{tensor.name}_dequantized", dtype=np.float32, shape=list(weights.shape))
    attrs = {"axis": axis} if axis >= 0 else {}
    size = scale.size if axis >= 0 else None
    graph.nodes.append(gs.Node("DequantizeLinear", f"{tensor.name}_DequantizeLinear", attrs=attrs,
                               inputs=[q_const, _scale_const(f"{tensor.name}_scale", scale),
                                       _zero_point(f"{tensor.name}_zero_point", size)],
                               outputs=[dq_out]))
    for node in list(tensor.outputs):
        if node.op in QUANTIZED_OPS and node.name not in keep_float:  # e.g. a table shared with a Gather
            _replace_input(node, tensor, dq_out)
    return 1


def _nearest(weights: np.ndarray, axis: int, qmax: float) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric round-to-nearest, per channel along `axis` (-1: per tensor): (int8 values, float32 scales)."""
    if axis >= 0:
        reduce_axes = tuple(i for i in range(weights.ndim) if i != axis)
        amax = np.max(np.abs(weights), axis=reduce_axes)
    else:
        amax = np.max(np.abs(weights), keepdims=False)
    amax = np.where(amax > 0, amax, 1.0).astype(np.float32)
    scale = (amax / np.float32(qmax)).astype(np.float32)
    shape = [1] * weights.ndim
    if axis >= 0:
        shape[axis] = -1
    return np.clip(np.rint(weights / scale.reshape(shape)), -qmax, qmax).astype(np.int8), scale


def _dequantized(tensor: gs.Tensor) -> bool:
    return bool(tensor.inputs) and tensor.inputs[0].op == "DequantizeLinear"


def _bias_of(node: gs.Node) -> np.ndarray:
    bias = node.inputs[2] if len(node.inputs) > 2 and not node.inputs[2].is_empty() else None
    return np.asarray(bias.values, dtype=np.float64).reshape(-1) if bias is not None else np.float64(0.0)


def _dequantized_row_sums(node: gs.Node) -> np.ndarray:
    """Per output channel, the sum of the weights the quantized layer computes with (int8 values times their
    per-channel scales, along the axis its DequantizeLinear names)."""
    dq = node.inputs[1].inputs[0]
    q, scale = (np.asarray(t.values, dtype=np.float64) for t in dq.inputs[:2])
    axis = int(dq.attrs.get("axis", 1))
    shape = [1] * q.ndim
    shape[axis] = -1
    return (q * scale.reshape(shape)).sum(axis=tuple(i for i in range(q.ndim) if i != axis))


def _set_bias(node: gs.Node, bias: np.ndarray, what: str = "corrected") -> None:
    """A new constant (the FP32 bias may be read elsewhere), shaped like the old one."""
    old = node.inputs[2] if len(node.inputs) > 2 and not node.inputs[2].is_empty() else None
    shape = old.values.shape if isinstance(old, gs.Constant) else bias.shape
    dtype = old.values.dtype if isinstance(old, gs.Constant) else np.float32
    name = f"{old.name if old is not None else node.name + '_bias'}_{what}"
    while len(node.inputs) < 3:
        node.inputs.append(gs.Variable.empty())
    node.inputs[2] = gs.Constant(name, np.asarray(bias).reshape(shape).astype(dtype))


def _replace_input(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    for i, t in enumerate(node.inputs):
        if t is old:
            node.inputs[i] = new
