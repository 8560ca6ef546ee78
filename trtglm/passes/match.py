"""Small graph-matching helpers shared by the passes (a tensor's producer, its single consumer, its constant value,
whether it is non-negative by construction, the source of a float Cast, provably equal dims). A pattern may only swallow a tensor that nothing else reads and that
is no graph output."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto

FLOAT_PROTOS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)


def producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if len(tensor.inputs) == 1 else None


def single_consumer(tensor: gs.Tensor, outputs: set[int]) -> gs.Node | None:
    """The one node reading `tensor`, or None when it has several readers or is a graph output (id in `outputs`)."""
    if id(tensor) in outputs or len({id(n) for n in tensor.outputs}) != 1:
        return None
    return tensor.outputs[0]


def only_consumer(tensor: gs.Tensor, node: gs.Node, outputs: set[int]) -> bool:
    return single_consumer(tensor, outputs) is node


def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of an initializer or of a Constant node's output; None for anything computed at run time."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    node = producer(tensor)
    if node is not None and node.op == "Constant" and isinstance(node.attrs.get("value"), gs.Constant):
        return np.asarray(node.attrs["value"].values)
    return None


def clip_bounds(clip: gs.Node) -> tuple[float | None, float | None]:
    """A Clip's (min, max): inputs from opset 11, attributes before; +-inf when absent, None when computed."""
    bounds = []
    for index, attr, default in ((1, "min", -np.inf), (2, "max", np.inf)):
        if len(clip.inputs) > index and not clip.inputs[index].is_empty():
            value = constant_value(clip.inputs[index])
            bounds.append(None if value is None else float(np.asarray(value).reshape(-1)[0]))
        else:
            bounds.append(float(clip.attrs.get(attr, default)))
    return bounds[0], bounds[1]


def pad_value(pad: gs.Node) -> float | None:
    """The fill value of a constant-mode Pad (0 when not given, the axes input of opset 18 allowed); None for other
    modes or a value computed at run time."""
    if pad.attrs.get("mode", "constant") != "constant":
        return None
    if len(pad.inputs) < 3 or pad.inputs[2].is_empty():
        return 0.0
    value = constant_value(pad.inputs[2])
    return None if value is None else float(np.asarray(value).reshape(-1)[0])


NON_NEGATIVE_OPS = ("Relu", "Sigmoid", "Softmax")
SAME_SIGN_OPS = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Reshape", "Flatten", "Transpose",
                 "Identity", "Squeeze", "Unsqueeze")  # >= 0 wherever their data input is


def non_negative(tensor: gs.Tensor, depth: int = 16) -> bool:
    """Whether every value of the tensor is >= 0 for any model input, from the ops that produce it."""
    if isinstance(tensor, gs.Constant):
        return tensor.values.size > 0 and bool(np.all(np.asarray(tensor.values) >= 0))
    if depth == 0 or not tensor.inputs:
        return False
    node = tensor.inputs[0]
    if node.op in NON_NEGATIVE_OPS:
        return True
    if node.op == "Clip":
        low = clip_bounds(node)[0]
        return low is not None and low >= 0.0
    if node.op in SAME_SIGN_OPS:
        return non_negative(node.inputs[0], depth - 1)
    if node.op == "Pad":  # edge and reflect modes repeat values of the input
        value = pad_value(node)
        return (node.attrs.get("mode", "constant") != "constant" or value is not None and value >= 0.0) \
            and non_negative(node.inputs[0], depth - 1)
    if node.op in ("Min", "Concat", "Mul"):  # Relu + per-channel Min from equalize; Mul of non-negatives
        return all(non_negative(t, depth - 1) for t in node.inputs)
    if node.op == "Max":
        return any(non_negative(t, depth - 1) for t in node.inputs)
    return False


def float_cast_source(tensor: gs.Tensor) -> gs.Tensor | None:
    """The float tensor a float-to-float Cast made `tensor` from (an FP16 graph's Casts around its FP32 parts),
    else None."""
    cast = producer(tensor)
    if cast is None or cast.op != "Cast" or not (_is_float(cast.inputs[0]) and _is_float(tensor)):
        return None
    return cast.inputs[0]


def _is_float(t: gs.Tensor) -> bool:
    if isinstance(t.dtype, (int, np.integer)):  # gs keeps types numpy lacks (bfloat16) as TensorProto ints
        return int(t.dtype) in FLOAT_PROTOS
    try:
        return t.dtype is not None and np.dtype(t.dtype).kind == "f"
    except TypeError:
        return False


def same_dim(a, b) -> bool:
    """Two dims known to be equal at run time: the same non-negative int, or the same named symbol."""
    return a is not None and b is not None and a != "" and not (isinstance(a, (int, np.integer)) and a < 0) \
        and a == b
