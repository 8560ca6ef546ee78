"""Numpy reference of the TrtglmAttention plugin (plugins/attention/attention.cu): what the kernels must compute.

    out = softmax(scale * Q K^T + mask) V, per (batch, query head), in float64

Layouts are those of plugins/common/kernels.h (AttentionParams): q [batch, q_heads, q_len, head_dim], k and v
[batch, kv_heads, kv_len, head_dim], out like q. Grouped-query attention: q_heads is a multiple of kv_heads and
query head h reads kv head h // (q_heads // kv_heads). K and V hold the whole cache (past and current tokens), so
with `causal` query i (0-based among the q_len queries) sees the keys j <= i + (kv_len - q_len): the queries are the
last q_len positions of the sequence. That one rule covers prefill (kv_len == q_len), prefill after a cached
prefix, and decode (q_len == 1 sees every key). A query that sees no key (only possible when kv_len < q_len) gets
zeros, as the kernels write.

The kernels read fp16/bf16 and accumulate in fp32; this reference takes any float array and computes in float64,
returning float64: tests round the inputs to the kernel's type first and compare against this.
"""

from __future__ import annotations

import numpy as np


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float | None = None,
              causal: bool = True) -> np.ndarray:
    """softmax(scale q k^T [+ causal mask]) v with grouped-query heads; float64 [batch, q_heads, q_len, head_dim].

    scale None means 1 / sqrt(head_dim).
    """
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
        raise ValueError(f"attention: q {q.shape}, k {k.shape}, v {v.shape}: expected q [batch, q_heads, q_len, "
                         "head_dim] and k, v [batch, kv_heads, kv_len, head_dim]")
    batch, q_heads, q_len, head_dim = q.shape
    kb, kv_heads, kv_len, kd = k.shape
    if kb != batch or kd != head_dim or q_heads % kv_heads:
        raise ValueError(f"attention: q {q.shape} and k/v {k.shape} disagree: batch and head_dim must match and "
                         "q_heads must be a multiple of kv_heads")
    if scale is None:
        scale = 1.0 / np.sqrt(head_dim)
    group = q_heads // kv_heads
    k = np.repeat(k, group, axis=1)  # query head h reads kv head h // group
    v = np.repeat(v, group, axis=1)
    scores = scale * np.einsum("bhqd,bhkd->bhqk", q, k)
    if causal:
        rows = np.arange(q_len)[:, None] + (kv_len - q_len)
        scores = np.where(np.arange(kv_len)[None, :] <= rows, scores, -np.inf)
    peak = scores.max(axis=-1, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)  # a row that sees no key: all weights 0
    weights = np.exp(scores - peak)
    total = weights.sum(axis=-1, keepdims=True)
    weights = weights / np.where(total > 0, total, 1.0)
    return np.einsum("bhqk,bhkd->bhqd", weights, v)
