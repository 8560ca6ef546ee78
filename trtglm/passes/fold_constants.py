"""Constant folding, shape subgraphs of static shapes included.

Why: exporters leave arithmetic on weights (Transpose/Reshape/Cast of initializers, `Constant` nodes) and shape
computations (Shape -> Gather -> Unsqueeze -> Concat -> Reshape) in the graph. TensorRT would run the former as
layers and treat the latter as shape tensors; both block its layer fusions and Q/DQ placement, which expect a
weight to be a plain initializer and a Reshape's shape to be a constant. The later passes (fold_batchnorm,
insert_qdq) only match constants, so folding runs first.

onnx-graphsurgeon's `Graph.fold_constants` evaluates foldable subgraphs with ONNX Runtime; it folds `Shape` only
where the tensor's shape is static in the graph, so shapes are inferred first and the fold repeats while it makes
progress (a folded Reshape shape makes the next Shape static). A graph output that folds to a constant stays a
graph output under its own name, produced by a `Constant` node: an initializer as a graph output is something
TensorRT and several runtimes reject.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from trtglm import runtime
from trtglm.onnx_io import PROTO_LIMIT

if TYPE_CHECKING:
    from trtglm.passes import PassContext

MAX_ROUNDS = 4


def fold_constants(graph: gs.Graph, ctx: PassContext) -> int:
    before = len(graph.nodes)
    graph.cleanup().toposort()
    for _ in range(MAX_ROUNDS):
        count = len(graph.nodes)
        signature = _signature(graph)
        annotate_shapes(graph, ctx.log)
        _fold_once(graph)
        _keep_outputs_computed(graph)
        graph.cleanup().toposort()
        if len(graph.nodes) == count and _signature(graph) == signature:
            break
    removed = before - len(graph.nodes)
    if removed:
        ctx.log.append(f"fold_constants: {removed} nodes folded")
    return removed


def _fold_once(graph: gs.Graph) -> None:
    """One ORT session for the whole foldable subgraph; if it fails, one per output node (slower, partial)."""
    try:
        runtime.quiet()  # graphsurgeon folds with ONNX Runtime sessions of its own
        graph.fold_constants(fold_shapes=True, partitioning=None, error_ok=False)
    except Exception:  # noqa: BLE001 - whatever ORT raised, the partitioned fold skips just the failing part
        graph.fold_constants(fold_shapes=True, partitioning="basic", error_ok=True)


def _signature(graph: gs.Graph) -> tuple:
    return tuple((node.op, tuple(t.name for t in node.inputs)) for node in graph.nodes)


def annotate_shapes(graph: gs.Graph, log: list[str] | None = None) -> None:
    """Give tensors the shapes and types ONNX shape inference knows, where the graph knows less.

    Shape folding reads `tensor.shape`; a graph built or rewritten in memory often has no shapes on its
    intermediate tensors, and a fold can make a dynamic shape static (a Reshape whose shape became a constant).
    Other passes use it too (fold_batchnorm needs the rank of a BN input). Failures are logged, not raised.
    """
    tensors = graph.tensors()
    try:
        model = gs.export_onnx(graph, do_type_check=False)
        if model.ByteSize() >= PROTO_LIMIT:
            return
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as e:  # noqa: BLE001 - onnx raises several types; folding still works without shapes
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if log is not None:
            log.append(f"shape inference failed ({first}); tensors without shapes keep none")
        return
    graph_io = {t.name for t in graph.inputs} | {t.name for t in graph.outputs}
    for info in inferred.graph.value_info:
        tensor = tensors.get(info.name)
        if not isinstance(tensor, gs.Variable) or info.name in graph_io or not info.type.HasField("tensor_type"):
            continue
        ttype = info.type.tensor_type
        if tensor.dtype is None and ttype.elem_type:
            tensor.dtype = onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type)
        if not ttype.HasField("shape"):
            continue
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in ttype.shape.dim]
        if tensor.shape is None or (len(shape) == len(tensor.shape) and _n_static(shape) > _n_static(tensor.shape)):
            tensor.shape = shape


def _n_static(shape) -> int:
    return sum(isinstance(d, int) and d >= 0 for d in shape)


def _keep_outputs_computed(graph: gs.Graph) -> None:
    """A graph output that folded into a constant gets a `Constant` node, so it keeps its name and stays an output."""
    for i, out in enumerate(graph.outputs):
        if not isinstance(out, gs.Constant):
            continue
        values = np.asarray(out.values)
        out.name = f"{out.name}__folded"
        tensor = gs.Variable(out.name[: -len("__folded")], dtype=values.dtype, shape=list(values.shape))
        node = gs.Node("Constant", name=f"{tensor.name}_const", attrs={"value": gs.Constant(out.name, values)},
                       outputs=[tensor])
        graph.nodes.append(node)
        graph.outputs[i] = tensor
