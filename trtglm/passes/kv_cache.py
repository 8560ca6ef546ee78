"""INT8 KV cache (`--kv-cache int8`): the past/present key and value tensors cross the graph boundary as int8,
with one scale per KV head.

Why: at long contexts the cache, not the weights, fills GPU memory and bounds decode speed (every step reads all
of it); int8 halves it against FP16. Keys and values differ most between heads, so the scale is per head (axis 1
of [batch, kv_heads, seq, head_dim]), calibrated as the absmax over calibration data of the present tensors. The
graph reads `past_key_values.{i}.key` as int8 and dequantizes it (DequantizeLinear, axis 1), and quantizes
`present.{i}.key` (QuantizeLinear, axis 1) before it leaves: a present is the past extended, so both use the
present's scale and a decode step's output is the next step's input unchanged. Inside, attention stays float.
"""

from __future__ import annotations

import re

import numpy as np
import onnx_graphsurgeon as gs

from trtglm.errors import ModelError

PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)")


def present_name(past: str) -> str:
    layer, kind = PAST.fullmatch(past).groups()
    return f"present.{layer}.{kind}"


def cache_pairs(graph: gs.Graph) -> list[tuple[gs.Variable, gs.Variable]]:
    """(past input, present output) per layer and kind; a model without a cache gives a one-line error."""
    outputs = {t.name: t for t in graph.outputs}
    pairs = [(t, outputs.get(present_name(t.name))) for t in graph.inputs if PAST.fullmatch(t.name)]
    missing = [p.name for p, q in pairs if q is None]
    if not pairs or missing:
        raise ModelError("--kv-cache int8: the model needs past_key_values.{i}.key/value inputs and present.{i}."
                         "key/value outputs" + (f" (no present output for '{missing[0]}')" if missing else ""))
    return pairs


def quantize_kv_cache(graph: gs.Graph, amax: dict[str, np.ndarray]) -> int:
    """`amax`: present output name -> per-head absmax (kv_heads,). Returns the number of cache tensors quantized."""
    count = 0
    for past, present in cache_pairs(graph):
        heads = np.asarray(amax[present.name], dtype=np.float32)
        scale = gs.Constant(f"{present.name}_kv_scale", (np.maximum(heads, 1e-8) / 127.0).astype(np.float32))
        zero = gs.Constant(f"{present.name}_kv_zero_point", np.zeros(heads.shape, np.int8))
        # past: int8 graph input -> DequantizeLinear -> the float tensor the graph used to read
        float_past = gs.Variable(f"{past.name}_dequantized", dtype=past.dtype, shape=past.shape)
        _redirect(past, float_past)
        graph.nodes.append(gs.Node("DequantizeLinear", f"{past.name}_DequantizeLinear", {"axis": 1},
                                   inputs=[past, scale, zero], outputs=[float_past]))
        past.dtype = np.int8
        # present: the float tensor the graph computes -> QuantizeLinear -> int8 graph output of the same name
        float_present = gs.Variable(f"{present.name}_float", dtype=present.dtype, shape=present.shape)
        producer = present.inputs[0]
        producer.outputs[producer.outputs.index(present)] = float_present
        _redirect(present, float_present)
        graph.nodes.append(gs.Node("QuantizeLinear", f"{present.name}_QuantizeLinear", {"axis": 1},
                                   inputs=[float_present, scale, zero], outputs=[present]))
        present.dtype = np.int8
        count += 2
    graph.cleanup().toposort()
    return count


def _redirect(old: gs.Tensor, new: gs.Tensor) -> None:
    """Every node reading `old` reads `new` instead."""
    for node in list(old.outputs):
        for i, tensor in enumerate(node.inputs):
            if tensor is old:
                node.inputs[i] = new
