"""Run an explicit sequence of passes and report what each one did.

Why: the pipeline's order of passes is a plain tuple (DEFAULT_PIPELINE), not a registry; this is the one loop
that applies it, so every build reports the same per-pass rewrite counts (`trtglm build` prints them, and a
pass that stops matching shows up as a zero).
"""

from __future__ import annotations

from typing import Callable, Iterable

import onnx_graphsurgeon as gs

from trtglm.passes import PassContext

Pass = Callable[[gs.Graph, PassContext], int]


def run_passes(graph: gs.Graph, passes: Iterable[Pass], ctx: PassContext | None = None) -> dict[str, int]:
    """Apply `passes` in order to `graph` (in place); return {pass name: rewrite count}.

    A pass that appears more than once is reported as `name`, `name#2`, ... in the order it ran.
    """
    ctx = ctx if ctx is not None else PassContext(opset=_opset(graph))
    report: dict[str, int] = {}
    for fn in passes:
        name = getattr(fn, "__name__", type(fn).__name__)
        key, n = name, 1
        while key in report:
            n += 1
            key = f"{name}#{n}"
        report[key] = int(fn(graph, ctx))
    return report


def _opset(graph: gs.Graph) -> int:
    return int(graph.opset) if graph.opset else PassContext().opset


def fusion_summary(graph: gs.Graph, counts: dict[str, int], ctx: PassContext) -> dict[str, int]:
    """How many of each transformer block the optimized graph holds: fused into one op (by a pass or already by
    the exporter), or recognised by a pass and kept decomposed (ctx.recognised)."""
    ops = [node.op for node in graph.nodes]
    return {"attention": ops.count("Attention") + ctx.recognised["attention"],
            "layernorm": ops.count("LayerNormalization"),
            "rmsnorm": ops.count("RMSNormalization") + ctx.recognised["rmsnorm"],
            "gelu": ops.count("Gelu") + ctx.recognised["gelu"], "qkv_groups": counts.get("fuse_qkv", 0)}
