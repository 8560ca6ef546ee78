"""What the plugin-op mappings share: the plugin nodes' ONNX domain, tensor type and shape queries, and an emitter
for the standard ops of an ONNX-level fallback (plugin_ops: norms; plugin_rotary: rotary embedding).

The opset import: gs.Graph keeps the model's opset_import list in `graph.import_domains` (None for a graph built
in memory, which gs.export_onnx then fills with the ONNX domain at graph.opset). import_domain appends
("trtglm", 1) when a mapping adds a node; drop_domain removes it when no trtglm node is left.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from trtglm.passes.naming import node_name, tensor_name
from trtglm.plugins import NAMESPACE, VERSION

DOMAIN = NAMESPACE  # the ONNX domain of the plugin nodes; TensorRT reads plugin_namespace, ORT/onnx the domain
DOMAIN_VERSION = 1
FLOATS = ("float32", "float16", "bfloat16")
PLUGIN_ATTRS = {"plugin_version": VERSION, "plugin_namespace": NAMESPACE}  # every plugin node carries them
AXES_INPUT_OPSET = 13  # Squeeze/Unsqueeze take their axes as an input from opset 13


class Skip(Exception):
    """A pattern that stays as it is; the message says why (it goes to ctx.log)."""


class Emitter:
    """Adds nodes for one plugin node: fresh names under its name, tensors typed like its input."""

    def __init__(self, graph: gs.Graph, base: str, like: gs.Tensor, opset: int = AXES_INPUT_OPSET):
        self.graph, self.base, self.opset, self.nodes = graph, base, opset, []
        self.dtype, self.np_dtype = like.dtype, np_dtype(like) or np.float32

    def in_float32(self) -> Emitter:
        """An emitter for the same plugin node whose new tensors and constants are float32 (its nodes are listed
        with this one's)."""
        other = copy.copy(self)  # shares self.nodes
        other.dtype = other.np_dtype = np.dtype(np.float32)
        return other

    def var(self, what: str, like: gs.Tensor | None = None, dtype=None) -> gs.Variable:
        """A fresh tensor, typed `dtype`, else like `like`, else like the plugin node's input."""
        dtype = dtype if dtype is not None else (like.dtype if like is not None else self.dtype)
        return gs.Variable(tensor_name(self.graph, f"{self.base}/{what}"), dtype=dtype)

    def const(self, what: str, value, dtype=None) -> gs.Constant:
        dtype = dtype if dtype is not None else self.np_dtype
        return gs.Constant(tensor_name(self.graph, f"{self.base}/{what}"), np.asarray(value, dtype=dtype))

    def op(self, op: str, inputs: list, out: gs.Variable | None = None, **attrs) -> gs.Variable:
        out = out if out is not None else self.var(op)
        node = gs.Node(op, name=node_name(self.graph, f"{self.base}/{op}"), attrs=attrs, inputs=inputs,
                       outputs=[out])
        self.graph.nodes.append(node)
        self.nodes.append(node)
        return out

    def axes_op(self, op: str, x: gs.Tensor, axes: list[int], out: gs.Variable | None = None) -> gs.Variable:
        """Squeeze or Unsqueeze of `x` on `axes`, in the form the opset takes; the output typed like x."""
        out = out if out is not None else self.var(op, like=x)
        if self.opset >= AXES_INPUT_OPSET:
            return self.op(op, [x, self.const("axes", axes, np.int64)], out)
        return self.op(op, [x], out, axes=axes)

    def slice(self, x: gs.Tensor, start: int, end: int, axis: int) -> gs.Variable:
        """x[start:end] along `axis`, step 1, typed like x."""
        ints = [self.const(w, [v], np.int64) for w, v in (("starts", start), ("ends", end), ("axes", axis))]
        return self.op("Slice", [x, *ints], self.var("Slice", like=x))


def import_domain(graph: gs.Graph) -> None:
    if graph.import_domains is None:  # what gs.export_onnx would use for the ONNX domain
        graph.import_domains = [onnx.helper.make_opsetid("", graph.opset)]
    if all(d.domain != DOMAIN for d in graph.import_domains):
        graph.import_domains.append(onnx.helper.make_opsetid(DOMAIN, DOMAIN_VERSION))


def drop_domain(graph: gs.Graph) -> None:
    if graph.import_domains is not None and not any(n.domain == DOMAIN for n in graph.nodes):
        graph.import_domains = [d for d in graph.import_domains if d.domain != DOMAIN]


def dtype_name(tensor: gs.Tensor) -> str | None:
    """'float32', 'float16', 'bfloat16', ...; gs keeps types numpy lacks (bfloat16) as onnx TensorProto ints."""
    d = np_dtype(tensor)
    return None if d is None else np.dtype(d).name


def np_dtype(tensor: gs.Tensor):
    d = tensor.dtype
    if d is None:
        return None
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(int(d)) if isinstance(d, (int, np.integer)) else np.dtype(d)
    except (TypeError, KeyError, ValueError):
        return None


def tensor_type(tensor: gs.Tensor) -> int:
    """The tensor's onnx.TensorProto element type (what a Cast's `to` takes)."""
    d = tensor.dtype
    return int(d) if isinstance(d, (int, np.integer)) else onnx.helper.np_dtype_to_tensor_dtype(np.dtype(d))


def last_dim(tensor: gs.Tensor) -> int | None:
    shape = tensor.shape
    if shape and isinstance(shape[-1], (int, np.integer)) and shape[-1] > 0:
        return int(shape[-1])
    return None


def known_shape(tensor: gs.Tensor) -> bool:
    """Every dim a positive int or a named symbol: then equal shapes mean equal at run time (no broadcasting)."""
    return tensor.shape is not None and all(
        (isinstance(d, (int, np.integer)) and d > 0) or (isinstance(d, str) and d) for d in tensor.shape)
