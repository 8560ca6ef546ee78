"""Fresh tensor and node names for the nodes a pass adds (ONNX names must be unique in a graph)."""

from __future__ import annotations

from collections.abc import Collection

import onnx_graphsurgeon as gs


def unique_name(taken: Collection[str], base: str) -> str:
    """`base`, or `base_1`, `base_2`, ... whichever is not taken."""
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    return name


def tensor_name(graph: gs.Graph, base: str) -> str:
    return unique_name(graph.tensors().keys(), base)


def node_name(graph: gs.Graph, base: str) -> str:
    return unique_name({n.name for n in graph.nodes}, base)
