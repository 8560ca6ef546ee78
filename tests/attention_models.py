"""Attention blocks built in code, in the shapes exporters write them, for the fuse_attention tests.

`build_attention_block(style)` returns x (N, S, hidden) [+ attention_mask] -> Q/K/V projections -> attention ->
output projection -> output (N, S, hidden), with deterministic weights (numpy Generator from `seed`):
  bert    HF BERT eager: K^T = Transpose(0,1,3,2) of K4, scores Div sqrt(D), float additive mask (N,1,1,S)
  sdpa    PyTorch SDPA export: Mul(sqrt(scale)) on Q4 and on K^T, K^T = Transpose(0,2,3,1) of the head split,
          bool mask (N,1,S,S) -> Where(mask, 0, -inf) -> Add, Softmax, NaN guard Where(IsNaN(p), 0, p)
  gqa     kv_heads < heads, HF repeat_kv (Unsqueeze(2) -> Expand -> Reshape) on K4 and V4, Mul scale on scores
  rotary  x*cos + rotate_half(x)*sin on Q4 and K4 (rotate_half = Concat(-x2, x1)), then Div sqrt(sqrt(D))
          on each; no mask
Variants for the not-matched cases: softmax_axis, probs_output (P is also a graph output), constant_k (the scores
MatMul reads a constant instead of K^T).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HEADS = 4
HEAD_DIM = 8
# bert: Div-scaled scores + additive mask; sdpa: PyTorch SDPA (sqrt scales, Where mask, NaN guard); gqa: repeat_kv;
# rotary: RoPE on Q and K; bias: bert plus a relative position bias Add (MPNet, T5); dynamo: bert with K^T written
# as Reshape(Transpose(Reshape(K4, [B*H, Sk, D]), 0,2,1), [B, H, D, Sk]) as PyTorch's dynamo exporter does
STYLES = ("bert", "sdpa", "gqa", "rotary", "bias", "dynamo")


def build_attention_block(style: str = "bert", seq: int | str = 6, kv_heads: int = 2, opset: int = 17,
                          softmax_axis: int = -1, probs_output: bool = False, constant_k: bool = False,
                          seed: int = 0) -> onnx.ModelProto:
    if style not in STYLES:
        raise ValueError(f"style {style!r}: expected one of {', '.join(STYLES)}")
    rng = np.random.default_rng(seed)
    hidden, d = HEADS * HEAD_DIM, HEAD_DIM
    kv = kv_heads if style == "gqa" else HEADS
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def const(name: str, value) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(op_type: str, inputs: list[str], out: str, **attrs) -> str:
        nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def heads_split(name: str, n_heads: int, perm: list[int]) -> str:
        w = const(f"{name}.weight", (rng.standard_normal((hidden, n_heads * d)) / math.sqrt(hidden)).astype(np.float32))
        t = op("MatMul", ["x", w], f"{name}.proj")
        t = op("Reshape", [t, const(f"{name}.shape", np.array([0, 0, n_heads, d], np.int64))], f"{name}.reshape")
        return op("Transpose", [t], f"{name}.transpose", perm=perm)

    def rotary(t: str, name: str) -> str:
        pos = np.arange(seq)[:, None] * (1e-2 ** (np.arange(d) % (d // 2) / (d // 2)))[None, :]
        cos = const(f"{name}.cos", np.cos(pos).astype(np.float32))
        sin = const(f"{name}.sin", np.sin(pos).astype(np.float32))
        axes, zero, half, end = (const(f"{name}.{k}", np.array([v], np.int64))
                                 for k, v in (("axes", 3), ("zero", 0), ("half", d // 2), ("end", d)))
        x1 = op("Slice", [t, zero, half, axes], f"{name}.x1")
        x2 = op("Slice", [t, half, end, axes], f"{name}.x2")
        rot = op("Concat", [op("Neg", [x2], f"{name}.neg"), x1], f"{name}.rotate_half", axis=-1)
        return op("Add", [op("Mul", [t, cos], f"{name}.mul_cos"), op("Mul", [rot, sin], f"{name}.mul_sin")],
                  f"{name}.rotary")

    def repeat_kv(t: str, name: str) -> str:
        t = op("Unsqueeze", [t, const(f"{name}.axes", np.array([2], np.int64))], f"{name}.unsqueeze")
        n_rep = const(f"{name}.expand_shape", np.array([1, 1, HEADS // kv, 1, 1], np.int64))
        t = op("Expand", [t, n_rep], f"{name}.expand")
        return op("Reshape", [t, const(f"{name}.repeat_shape", np.array([0, HEADS, -1, d], np.int64))],
                  f"{name}.repeat")

    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", seq, hidden])]
    q = heads_split("q", HEADS, [0, 2, 1, 3])
    if style == "sdpa":
        root = const("sqrt_scale", np.array(1 / math.sqrt(math.sqrt(d)), np.float32))
        q = op("Mul", [q, root], "q.scale")
        kt = op("Mul", [heads_split("k", kv, [0, 2, 3, 1]), root], "kt.scale")
    else:
        k = heads_split("k", kv, [0, 2, 1, 3])
        if style == "rotary":
            q, k = rotary(q, "q"), rotary(k, "k")
            root = const("sqrt_div", np.array(math.sqrt(math.sqrt(d)), np.float32))
            q, k = op("Div", [q, root], "q.scaled"), op("Div", [k, root], "k.scaled")
        if style == "gqa":
            k = repeat_kv(k, "k")
        if style == "dynamo":
            flat = op("Reshape", [k, const("k.flat_shape", np.array([-1, seq, d], np.int64))], "k.flat")
            flat_t = op("Transpose", [flat], "k.flat_t", perm=[0, 2, 1])
            kt = op("Reshape", [flat_t, const("kt.shape", np.array([-1, HEADS, d, seq], np.int64))], "kt")
        else:
            kt = op("Transpose", [k], "kt", perm=[0, 1, 3, 2])
    if constant_k:
        kt = const("kt.const", rng.standard_normal((1, HEADS, d, seq)).astype(np.float32))
    v = heads_split("v", kv, [0, 2, 1, 3])
    if style == "gqa":
        v = repeat_kv(v, "v")

    scores = op("MatMul", [q, kt], "scores")
    if style in ("bert", "bias", "dynamo"):
        scores = op("Div", [scores, const("scores.div", np.array(math.sqrt(d), np.float32))], "scores.scaled")
        if style == "bias":
            bias = const("position_bias", rng.standard_normal((1, HEADS, seq, seq)).astype(np.float32))
            scores = op("Add", [scores, bias], "scores.biased")
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.FLOAT, ["N", 1, 1, seq]))
        scores = op("Add", [scores, "attention_mask"], "scores.masked")
    elif style == "gqa":
        scores = op("Mul", [scores, const("scores.mul", np.array(1 / math.sqrt(d), np.float32))], "scores.scaled")
    elif style == "sdpa":
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.BOOL, ["N", 1, seq, seq]))
        mask = op("Where", ["attention_mask", const("mask.zero", np.array(0.0, np.float32)),
                            const("mask.ninf", np.array(-np.inf, np.float32))], "mask.additive")
        scores = op("Add", [mask, scores], "scores.masked")
    probs = op("Softmax", [scores], "probs", axis=softmax_axis)
    if style == "sdpa":
        nan = op("IsNaN", [probs], "probs.isnan")
        probs = op("Where", [nan, const("probs.zero", np.array(0.0, np.float32)), probs], "probs.guarded")
    y = op("MatMul", [probs, v], "attn_output")
    y = op("Transpose", [y], "attn_output.transpose", perm=[0, 2, 1, 3])
    y = op("Reshape", [y, const("merge.shape", np.array([0, 0, hidden], np.int64))], "attn_output.merged")
    w_out = (rng.standard_normal((hidden, hidden)) / math.sqrt(hidden)).astype(np.float32)
    op("MatMul", [y, const("out.weight", w_out)], "output")

    outputs = [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", seq, hidden])]
    if probs_output:
        outputs.append(helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", HEADS, seq, seq]))
    graph = helper.make_graph(nodes, f"attention_{style}", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    return onnx.shape_inference.infer_shapes(model)
