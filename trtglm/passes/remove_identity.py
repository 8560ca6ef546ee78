"""Remove Identity, inference-mode Dropout and same-type Cast nodes, and nodes that feed no graph output.

Why: exporters leave Identity nodes (renamed outputs, tied weights) and Dropout (a no-op at inference) between
layers, and a Cast to the type the tensor already has (Llama's and T5's RMSNorm cast float32 to float32 around
the normalization). TensorRT fuses Conv+BN+activation and places Q/DQ by looking at a layer's direct neighbours, so a
pass-through node between them breaks the pattern (Conv -> Identity -> Relu is not fused; a weight behind an
Identity is not a constant for fold_batchnorm or insert_qdq). Dead nodes would only be calibrated and built for
nothing.

Graph output names are part of the deployment contract, so an Identity that produces a graph output is removed by
making its producer write the output tensor directly. It is kept when there is no producer to rewire: its input
is a graph input, an initializer, or itself a graph output (two outputs with one value).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs

if TYPE_CHECKING:
    from trtglm.passes import PassContext


def remove_identity(graph: gs.Graph, ctx: PassContext) -> int:
    before = len(graph.nodes)
    graph.toposort()
    bypassed = 0
    for node in list(graph.nodes):
        outputs = {t.name for t in graph.outputs}
        if (node.op == "Identity" or (node.op == "Dropout" and _dropout_is_identity(node, outputs))
                or (node.op == "Cast" and _cast_is_identity(node))):
            if _bypass(graph, node):
                bypassed += 1
    graph.cleanup().toposort()
    dead = before - bypassed - len(graph.nodes)
    if bypassed or dead:
        ctx.log.append(f"remove_identity: {bypassed} Identity/Dropout bypassed, {dead} dead nodes removed")
    return bypassed + dead


def _cast_is_identity(node: gs.Node) -> bool:
    src = node.inputs[0]
    if src.dtype is None or "to" not in node.attrs:
        return False
    try:
        return np.dtype(src.dtype) == np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs["to"])))
    except (TypeError, KeyError, ValueError):
        return False


def _dropout_is_identity(node: gs.Node, graph_outputs: set[str]) -> bool:
    """Dropout is the identity when it is not in training mode and its mask output is unused."""
    if len(node.outputs) > 1:
        mask = node.outputs[1]
        if not mask.is_empty() and (mask.outputs or mask.name in graph_outputs):
            return False
    if len(node.inputs) > 2 and not node.inputs[2].is_empty():  # training_mode (opset 12+)
        mode = node.inputs[2]
        if not isinstance(mode, gs.Constant) or bool(np.asarray(mode.values).any()):
            return False
    return True


def _bypass(graph: gs.Graph, node: gs.Node) -> bool:
    src, dst = node.inputs[0], node.outputs[0]
    outputs = {t.name for t in graph.outputs}
    if dst.name in outputs:
        # Keep the graph output tensor (name, dtype, shape); its value must come from a rewirable producer.
        if not isinstance(src, gs.Variable) or len(src.inputs) != 1 or src.name in outputs:
            return False
        if src in graph.inputs:
            return False
        producer = src.inputs[0]
        for consumer in list(src.outputs):
            if consumer is not node:
                _replace_input(consumer, src, dst)
        node.inputs.clear()
        node.outputs.clear()
        producer.outputs[producer.outputs.index(src)] = dst
        return True
    for consumer in list(dst.outputs):
        _replace_input(consumer, dst, src)
    node.inputs.clear()
    node.outputs.clear()
    return True


def _replace_input(consumer: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    for i, tensor in enumerate(consumer.inputs):
        if tensor is old:
            consumer.inputs[i] = new
