"""Cross-layer equalization (Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias Correction",
2019) of consecutive convolutions joined by a positively homogeneous activation.

Why: after BatchNorm folding, the per-output-channel weight ranges of a convolution (a depthwise one above all)
can differ by orders of magnitude: a BatchNorm channel with near-zero variance multiplies its weights by 20-60.
Per-channel INT8 weights cope with that, but the activation between the two layers is quantized per tensor, and
its small channels drown in the large ones' step. For W1 -> f -> W2 with f(s x) = s f(x) for s > 0 (ReLU, the
identity, LeakyReLU), scaling output channel i of W1 (and its bias) by 1/s_i and input channel i of W2 by s_i keeps
the function; s_i = sqrt(r1_i / r2_i), with r1_i and r2_i the channel's ranges in W1 and W2, makes both ranges
sqrt(r1_i r2_i). Chains (conv -> depthwise -> conv) are equalized pair by pair, over a few sweeps.

ReLU6 (Clip(0, 6)) is not homogeneous: after scaling, channel i saturates at 6 / s_i. Such a pair is equalized and
its Clip becomes Relu followed by Min with the per-channel bounds 6 / s_i (ONNX's Clip takes scalar bounds only),
which computes exactly the rescaled function; TensorRT fuses the Relu into the convolution, and the Min is one
pointwise layer with a constant (not measured here: no TensorRT). A Clip with another lower bound, and anything
else between the layers, is skipped and logged. A channel whose range is zero in either layer (dead, or a
BatchNorm with zero gamma) keeps s_i = 1: nothing is ever divided by zero. The FP32 function changes only by
float rounding (tests: <= 1e-4 relative).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from trtglm.passes.match import clip_bounds, constant_value, pad_value, single_consumer

if TYPE_CHECKING:
    from trtglm.passes import PassContext

HOMOGENEOUS = ("Relu", "LeakyRelu")
SWEEPS = 8  # conv -> depthwise -> conv chains settle in a few sweeps; each sweep leaves the function unchanged


def equalize(graph: gs.Graph, ctx: PassContext) -> int:
    """Equalize every matching Conv -> [activation] -> Conv pair; returns the number of pairs equalized."""
    outputs = {id(t) for t in graph.outputs}
    pairs, logged = [], set()
    for conv1 in [n for n in graph.nodes if n.op == "Conv"]:
        pair = _pair(conv1, outputs)
        if isinstance(pair, str):
            if pair and conv1.name not in logged:
                ctx.log.append(f"equalize: '{conv1.name}' skipped: {pair}")
                logged.add(conv1.name)
            continue
        pairs.append(pair)
    total = [np.ones(1) for _ in pairs]  # conv1's output channel i divided by total[i] over all sweeps
    for _ in range(SWEEPS):
        for i, (conv1, conv2) in enumerate(pairs):
            s = _equalize_pair(conv1, conv2)
            if s is not None:
                total[i] = total[i] * s
    for (conv1, conv2), s in zip(pairs, total):
        name = conv1.outputs[0].name
        if s.size > 1 and name in ctx.normals:  # the channels' BatchNorm statistics scale with them
            mean, std = ctx.normals[name]
            ctx.normals[name] = (mean / s, std / s)
        clip = conv1.outputs[0].outputs[0]
        if clip.op == "Clip" and s.size > 1 and np.isfinite(_clip_high(clip)):
            _per_channel_clip(graph, clip, _clip_high(clip) / s, len(conv1.inputs[1].shape) - 1)
            ctx.log.append(f"equalize: '{conv1.name}' -> '{conv2.name}' (its Clip now Relu + per-channel Min)")
        else:
            ctx.log.append(f"equalize: '{conv1.name}' -> '{conv2.name}'")
    graph.cleanup().toposort()
    return len(pairs)


def _pair(conv1: gs.Node, outputs: set[int]) -> tuple[gs.Node, gs.Node] | str:
    """(conv1, conv2) when conv1's output reaches only conv2's data input, through at most one homogeneous
    activation and a zero padding of the spatial axes (TensorFlow-style "same" padding, exported as a Pad); else
    why not ('' when there is simply no convolution after it)."""
    if not _own_initializers(conv1):
        return "its weights are not initializers of its own (computed, or shared with another node)"
    nxt = single_consumer(conv1.outputs[0], outputs)
    if nxt is None:
        return ""
    if nxt.op == "Clip":
        low = clip_bounds(nxt)[0]
        if low is None or float(low) != 0.0 or _clip_high(nxt) is None:
            return "the Clip after it does not clip at 0 (to a constant upper bound)"
        act, conv2 = nxt, single_consumer(nxt.outputs[0], outputs)
    elif nxt.op in HOMOGENEOUS:
        act, conv2 = nxt, single_consumer(nxt.outputs[0], outputs)
    else:
        act, conv2 = None, nxt
    if conv2 is not None and conv2.op == "Pad" and _zero_spatial_pad(conv2):
        conv2 = single_consumer(conv2.outputs[0], outputs)
        feeds = conv2.inputs[0].inputs[0].inputs[0] if conv2 is not None else None  # Pad's data input
    else:
        feeds = conv2.inputs[0] if conv2 is not None else None
    if conv2 is None or conv2.op != "Conv":
        return "" if act is None else f"its {act.op} does not feed one Conv"
    if feeds is not (act.outputs[0] if act is not None else conv1.outputs[0]):
        return "the next Conv reads it as weights"
    if not _own_initializers(conv2, bias=False):
        return f"the weights of '{conv2.name}' are not initializers of its own"
    return conv1, conv2


def _zero_spatial_pad(pad: gs.Node) -> bool:
    """A constant-mode Pad with value 0 that pads neither the batch nor the channel axis: it commutes with a
    per-channel scale."""
    if len(pad.inputs) < 2 or len(pad.inputs) > 3 or pad_value(pad) != 0.0:
        return False
    pads = constant_value(pad.inputs[1])
    if pads is None:
        return False
    pads = np.asarray(pads).reshape(-1)
    rank = pads.size // 2
    return rank >= 2 and not pads[[0, 1, rank, rank + 1]].any()


def _clip_high(clip: gs.Node) -> float | None:
    return clip_bounds(clip)[1]


def _per_channel_clip(graph: gs.Graph, clip: gs.Node, bounds: np.ndarray, rank: int) -> None:
    """Clip(x, 0, hi) -> Min(Relu(x), bounds) with bounds per channel (axis 1), keeping the output tensor."""
    x, y = clip.inputs[0], clip.outputs[0]
    relu_out = gs.Variable(f"{y.name}_relu", dtype=y.dtype, shape=y.shape)
    bound = gs.Constant(f"{y.name}_bound", bounds.reshape((-1,) + (1,) * (rank - 1)).astype(np.float32))
    graph.nodes.append(gs.Node("Relu", f"{clip.name}_relu", inputs=[x], outputs=[relu_out]))
    graph.nodes.append(gs.Node("Min", f"{clip.name}_min", inputs=[relu_out, bound], outputs=[y]))
    clip.inputs.clear()
    clip.outputs.clear()


def _own_initializers(conv: gs.Node, bias: bool = True) -> bool:
    """The weight (and bias) are initializers that only this node reads: they can be rewritten in place."""
    tensors = conv.inputs[1:3] if bias else conv.inputs[1:2]
    return all(isinstance(t, gs.Constant) and len(t.outputs) == 1 for t in tensors if not t.is_empty())


def _equalize_pair(conv1: gs.Node, conv2: gs.Node) -> np.ndarray | None:
    """Equalize the pair's weight ranges; returns the scales s (conv1's output channel i divided by s_i), None if
    unchanged."""
    w1 = np.asarray(constant_value(conv1.inputs[1]), dtype=np.float64)
    w2 = np.asarray(constant_value(conv2.inputs[1]), dtype=np.float64)
    channels = w1.shape[0]
    group = int(conv2.attrs.get("group", 1))
    per_group_in = w2.shape[1]
    if per_group_in * group != channels:
        return None  # shapes do not line up (cannot happen in a valid graph); leave the pair alone
    out_per_group = w2.shape[0] // group
    r1 = np.abs(w1.reshape(channels, -1)).max(axis=1)
    r2 = np.zeros(channels)
    for i in range(channels):  # input channel i of conv2: its group's output channels, column i % per_group_in
        g = i // per_group_in
        r2[i] = np.abs(w2[g * out_per_group:(g + 1) * out_per_group, i % per_group_in]).max()
    s = np.ones(channels)
    live = (r1 > 0) & (r2 > 0)
    s[live] = np.sqrt(r1[live] / r2[live])
    return _scale_pair(conv1, conv2, s)


def _scale_pair(conv1: gs.Node, conv2: gs.Node, s: np.ndarray) -> np.ndarray | None:
    """Divide conv1's output channel i (weights and bias) by s_i and multiply conv2's input channel i by s_i."""
    if np.allclose(s, 1.0, rtol=1e-9, atol=0):
        return None
    w1 = np.asarray(constant_value(conv1.inputs[1]), dtype=np.float64)
    w2 = np.asarray(constant_value(conv2.inputs[1]), dtype=np.float64)
    channels = w1.shape[0]
    group = int(conv2.attrs.get("group", 1))
    per_group_in = w2.shape[1]
    out_per_group = w2.shape[0] // group
    w1 = w1 / s.reshape((-1,) + (1,) * (w1.ndim - 1))
    for i in range(channels):
        g = i // per_group_in
        w2[g * out_per_group:(g + 1) * out_per_group, i % per_group_in] *= s[i]
    _set(conv1.inputs, 1, w1)
    _set(conv2.inputs, 1, w2)
    if len(conv1.inputs) > 2 and not conv1.inputs[2].is_empty():
        _set(conv1.inputs, 2, np.asarray(constant_value(conv1.inputs[2]), dtype=np.float64) / s)
    return s


def _set(inputs: list[gs.Tensor], index: int, value: np.ndarray) -> None:
    """Rewrite an initializer only this node reads, keeping its name and dtype."""
    tensor = inputs[index]
    tensor.values = value.astype(np.asarray(tensor.values).dtype)
