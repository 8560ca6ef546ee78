"""Recognise decomposed GELU subgraphs; from opset 20 replace each with one ONNX Gelu node.

Why: exporters write GELU as five to nine elementwise nodes (Div/Erf/Add/Mul/Mul, or the tanh approximation's
Pow/Mul/Add/Mul/Tanh/Add/Mul/Mul). TensorRT fuses a GELU into the GEMM before it (and into the INT8 GEMM's
epilogue when the GEMM is quantized) only if it sees a GELU: from opset 20 the ONNX Gelu op parses into one
activation layer; below opset 20 TensorRT's Myelin backend recognises the decomposed form itself, so the pass
leaves the nodes alone and only reports them. Either way insert_qdq must not put Q/DQ inside the pattern, which
is why the pass counts every GELU it finds.

Matched (x is any tensor; constants are scalars, rank 0 or shape (1,), within 1e-4 relative of the exact value):
  erf   0.5 * x * (1 + Erf(x / sqrt(2) | x * (1/sqrt(2))))                       ->  Gelu(x, approximate="none")
  tanh  0.5 * x * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 * (Pow(x, 3) | x*x*x))))  ->  Gelu(x, approximate="tanh")
Operands of every Add and Mul in either order; the product of 0.5, x and (1 + .) in any association:
(x*0.5)*(1+e), x*(0.5*(1+e)), (x*(1+e))*0.5. Every intermediate tensor has a single consumer and is no graph
output; x may have other consumers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from trtglm.passes.match import constant_value, only_consumer, producer, single_consumer
from trtglm.passes.naming import node_name

if TYPE_CHECKING:
    from trtglm.passes import PassContext

GELU_OPSET = 20
RTOL = 1e-4
SQRT_2 = math.sqrt(2.0)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
CUBIC_COEFF = 0.044715


@dataclass
class _Match:
    approximate: str  # "none" (erf form) | "tanh"
    x: gs.Tensor
    nodes: list[gs.Node]
    out: gs.Tensor


def fuse_gelu(graph: gs.Graph, ctx: PassContext) -> int:
    outputs = {id(t) for t in graph.outputs}
    found = 0
    for node in [n for n in graph.nodes if n.op in ("Erf", "Tanh")]:
        match = _match_erf(node, outputs) if node.op == "Erf" else _match_tanh(node, outputs)
        if match is None:
            continue
        found += 1
        form = "erf" if match.approximate == "none" else "tanh"
        if ctx.opset >= GELU_OPSET:
            _replace(graph, match)
            ctx.log.append(f"fuse_gelu: {len(match.nodes)} nodes ({form} form) -> Gelu '{match.out.name}'")
        else:
            ctx.recognised["gelu"] += 1
            ctx.log.append(f"fuse_gelu: GELU ({form} form) at '{match.out.name}' recognised, kept decomposed: "
                           f"opset {ctx.opset} < {GELU_OPSET} has no Gelu")
    graph.cleanup().toposort()
    return found


# --- matching ------------------------------------------------------------------------------------------------


def _match_erf(erf: gs.Node, outputs: set[int]) -> _Match | None:
    """Erf(x / sqrt(2) | x * (1/sqrt(2))) -> tail."""
    arg = erf.inputs[0]
    scale = producer(arg)
    if scale is None or not only_consumer(arg, erf, outputs):
        return None
    if scale.op == "Div":
        x = scale.inputs[0] if _is_near(scale.inputs[1], SQRT_2) else None
    elif scale.op == "Mul":
        x = _other_than_constant(scale, 1.0 / SQRT_2)
    else:
        x = None
    if x is None:
        return None
    tail = _match_tail(erf, x, outputs)
    return None if tail is None else _Match("none", x, [scale, erf, *tail[0]], tail[1])


def _match_tanh(tanh: gs.Node, outputs: set[int]) -> _Match | None:
    """Tanh(sqrt(2/pi) * (x + 0.044715 * x^3)) -> tail."""
    arg = tanh.inputs[0]
    scale = producer(arg)
    if scale is None or scale.op != "Mul" or not only_consumer(arg, tanh, outputs):
        return None
    inner = _other_than_constant(scale, SQRT_2_OVER_PI)
    add = producer(inner) if inner is not None else None
    if add is None or add.op != "Add" or len(add.inputs) != 2 or not only_consumer(inner, scale, outputs):
        return None
    for x, cubic in (add.inputs, add.inputs[::-1]):
        cubic_nodes = _match_cubic_term(cubic, x, add, outputs)
        if cubic_nodes is not None:
            tail = _match_tail(tanh, x, outputs)
            if tail is None:
                return None
            return _Match("tanh", x, [*cubic_nodes, add, scale, tanh, *tail[0]], tail[1])
    return None


def _match_cubic_term(term: gs.Tensor, x: gs.Tensor, consumer: gs.Node, outputs: set[int]) -> list[gs.Node] | None:
    """term = 0.044715 * (Pow(x, 3) | (x*x)*x | x*(x*x)), feeding only `consumer`: its nodes, else None."""
    coeff = producer(term)
    if coeff is None or coeff.op != "Mul" or not only_consumer(term, consumer, outputs):
        return None
    cube = _other_than_constant(coeff, CUBIC_COEFF)
    power = producer(cube) if cube is not None else None
    if power is None or not only_consumer(cube, coeff, outputs):
        return None
    if power.op == "Pow" and power.inputs[0] is x and _is_near(power.inputs[1], 3.0):
        return [power, coeff]
    if power.op != "Mul" or len(power.inputs) != 2:
        return None
    for a, b in (power.inputs, power.inputs[::-1]):
        square = producer(b)
        if (a is x and square is not None and square.op == "Mul" and all(t is x for t in square.inputs)
                and only_consumer(b, power, outputs)):
            return [square, power, coeff]
    return None


def _match_tail(act: gs.Node, x: gs.Tensor, outputs: set[int]) -> tuple[list[gs.Node], gs.Tensor] | None:
    """Add(act, 1) then the product with x and 0.5 in any association: (nodes, output), else None."""
    t = act.outputs[0]
    add = single_consumer(t, outputs)
    if add is None or add.op != "Add" or _other_than_constant(add, 1.0) is not t:
        return None
    one_plus = add.outputs[0]
    mul = single_consumer(one_plus, outputs)
    if mul is None or mul.op != "Mul" or len(mul.inputs) != 2 or mul.inputs[0] is mul.inputs[1]:
        return None
    other = mul.inputs[1] if mul.inputs[0] is one_plus else mul.inputs[0]
    product = mul.outputs[0]
    if other is x:  # (x * (1+e)) * 0.5
        last = single_consumer(product, outputs)
        if last is not None and last.op == "Mul" and _other_than_constant(last, 0.5) is product:
            return [add, mul, last], last.outputs[0]
    elif _is_near(other, 0.5):  # x * (0.5 * (1+e))
        last = single_consumer(product, outputs)
        if last is not None and last.op == "Mul" and _other_input(last, product) is x:
            return [add, mul, last], last.outputs[0]
    else:  # (x * 0.5) * (1+e)
        half = producer(other)
        if (half is not None and half.op == "Mul" and _other_than_constant(half, 0.5) is x
                and only_consumer(other, mul, outputs)):
            return [add, half, mul], product
    return None


# --- rewriting -----------------------------------------------------------------------------------------------


def _replace(graph: gs.Graph, match: _Match) -> None:
    out = match.out
    match.nodes[-1].outputs.clear()  # the old chain is now dead; cleanup() removes it
    graph.nodes.append(gs.Node("Gelu", name=node_name(graph, f"{out.name}_Gelu"),
                               attrs={"approximate": match.approximate}, inputs=[match.x], outputs=[out]))


# --- helpers -------------------------------------------------------------------------------------------------


def _other_input(node: gs.Node, tensor: gs.Tensor) -> gs.Tensor | None:
    """The input of binary `node` that is not `tensor` (which must be one of its two inputs)."""
    if len(node.inputs) != 2:
        return None
    if node.inputs[0] is tensor:
        return node.inputs[1]
    return node.inputs[0] if node.inputs[1] is tensor else None


def _other_than_constant(node: gs.Node, expected: float) -> gs.Tensor | None:
    """For binary `node` with one input a scalar constant near `expected`: the other input, else None."""
    if len(node.inputs) != 2:
        return None
    for const, other in (node.inputs[::-1], node.inputs):
        if _is_near(const, expected):
            return other
    return None


def _is_near(tensor: gs.Tensor, expected: float) -> bool:
    value = constant_value(tensor)
    # Rank <= 1: a (1, 1) constant would broadcast a 1-D x to 2-D, which Gelu(x) would not.
    if value is None or value.size != 1 or value.ndim > 1 or not np.issubdtype(value.dtype, np.number):
        return False
    return bool(np.isclose(float(value.reshape(-1)[0]), expected, rtol=RTOL, atol=0.0))
