"""Implicit zero padding made explicit where it keeps a ReLU output off the unsigned grid (`--explicit-pads`).

Why: the unsigned grid (insert_qdq) quantizes a non-negative tensor as x - c and puts c back through each
reader's bias. A Conv that pads implicitly (its `pads` attribute, as PyTorch exports every 3x3 convolution) would
pad x - c with zeros, which stand for x = c, so such an input stays signed and uses only the INT8 codes 0..127. In a
MobileNet or ResNet exported from PyTorch that is the input of every depthwise and every 3x3 convolution: the
layers where EfficientNet-Lite's TensorFlow-style graph (an explicit Pad in front of each) gains most from the grid.

This pass rewrites Conv(x, pads=P) into Conv(Pad(x, P, 0), pads=0) when x is non-negative by construction and
every node that reads x is a Conv with a constant weight and bias and the same padding P (then one Pad feeds them
all, and x has no other reader that would need its own Q/DQ): the FP32 function is unchanged, bit for bit.
insert_qdq then sees a zero Pad of a non-negative tensor read by a Conv without implicit padding: it puts x on the
unsigned grid, moves the centring Sub in front of the Pad and makes the Pad fill with -c, so the padding stays
exact.

The cost: TensorRT fuses a zero Pad into the convolution that follows, but not one that fills with -c; that is a
pass over the tensor (in INT8 if TensorRT moves the Pad behind the QuantizeLinear) that the implicit padding did
not have. Not measured here (no TensorRT), so it is opt-in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from trtglm.passes.match import non_negative
from trtglm.passes.naming import node_name, tensor_name

if TYPE_CHECKING:
    from trtglm.passes import PassContext

PAD_INPUT_OPSET = 11  # Pad takes its pads and value as inputs from opset 11


def explicit_pads(graph: gs.Graph, ctx: PassContext) -> int:
    """Give every qualifying Conv an explicit zero Pad; returns the number of Convs rewritten."""
    if ctx.opset < PAD_INPUT_OPSET:
        return 0
    outputs = {id(t) for t in graph.outputs}
    count = 0
    for tensor in _padded_inputs(graph):
        why = _why_not(tensor, outputs)
        if why:
            ctx.log.append(f"explicit_pads: '{tensor.name}' keeps implicit padding: {why}")
            continue
        convs = list(tensor.outputs)
        padded = _pad(graph, tensor, tuple(int(p) for p in convs[0].attrs["pads"]))
        for conv in convs:
            conv.inputs[0] = padded
            conv.attrs["pads"] = [0] * len(conv.attrs["pads"])
            count += 1
    if count:
        graph.cleanup().toposort()
    return count


def _padded_inputs(graph: gs.Graph) -> list[gs.Variable]:
    """The data inputs of Convs that pad implicitly, each once, in graph order."""
    seen, found = set(), []
    for node in graph.nodes:
        x = node.inputs[0] if node.op == "Conv" and node.inputs else None
        if isinstance(x, gs.Variable) and any(node.attrs.get("pads", [0])) and id(x) not in seen:
            seen.add(id(x))
            found.append(x)
    return found


def _why_not(tensor: gs.Variable, outputs: set[int]) -> str | None:
    if not non_negative(tensor):
        return "not non-negative by construction"
    if id(tensor) in outputs:
        return "a graph output"
    pads = {tuple(n.attrs.get("pads", ())) for n in tensor.outputs}
    for node in tensor.outputs:
        if node.op != "Conv" or node.inputs[0] is not tensor or len(node.inputs) < 2 \
                or not isinstance(node.inputs[1], gs.Constant):
            return f"also read by {node.op} '{node.name}', which could not take the unsigned grid's shift"
        if len(node.inputs) > 2 and not node.inputs[2].is_empty() and not isinstance(node.inputs[2], gs.Constant):
            return f"read by Conv '{node.name}', whose bias is computed"
        if node.attrs.get("auto_pad", "NOTSET") != "NOTSET":
            return f"read by Conv '{node.name}' with auto_pad"
    if len(pads) > 1:  # a padded and an unpadded copy would each need their own Q/DQ
        return "read by Convs with different padding"
    return None


def _pad(graph: gs.Graph, x: gs.Variable, conv_pads: tuple[int, ...]) -> gs.Variable:
    """Pad(x, conv_pads on the spatial axes, 0): ONNX Pad lists all begins, then all ends, batch and channel too."""
    half = len(conv_pads) // 2
    pads = [0, 0, *conv_pads[:half], 0, 0, *conv_pads[half:]]
    dtype = np.float16 if x.dtype == np.float16 else np.float32
    base = tensor_name(graph, f"{x.name}_padded")
    out = gs.Variable(base, dtype=x.dtype)
    graph.nodes.append(gs.Node("Pad", node_name(graph, f"{x.name}_pad"),
                               inputs=[x, gs.Constant(f"{base}_pads", np.asarray(pads, np.int64)),
                                       gs.Constant(f"{base}_value", np.zeros((), dtype))],
                               outputs=[out], attrs={"mode": "constant"}))
    return out
