"""Numpy reference of the TrtglmRotary plugin (plugins/rotary/rotary.cu): rotary position embedding on Q and K.

Only the first rotary_dim channels of each head rotate (GLM: head_dim / 2; Llama: head_dim); the others are
copied. Pair i of token t in batch b, with c = cos[b, t, i] and s = sin[b, t, i]:

    (a, d) -> (a c - d s, d c + a s)
    interleaved (GLM, GPT-J):  a = x[2i], d = x[2i + 1]
    halves (Llama rotate_half): a = x[i], d = x[i + rotary_dim / 2]

Layouts are those of plugins/common/kernels.h (RotaryParams): q [batch, q_heads, seq, head_dim], k [batch, kv_heads,
seq, head_dim], cos and sin [batch, seq, rotary_dim / 2] float32, already gathered at each token's position
(rotary_tables builds them from positions). rotary_dim = 2 * cos.shape[-1].

Computes in float64 and returns float64 (tests compare the kernels' output against it; cast for a storage type).
"""

from __future__ import annotations

import numpy as np


def rotary_tables(positions: np.ndarray, rotary_dim: int, base: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [batch, seq, rotary_dim / 2] float32 of positions [batch, seq]; angle = pos * base^(-2i / rotary_dim)
    for pair i."""
    if rotary_dim < 2 or rotary_dim % 2:
        raise ValueError(f"rotary_tables: rotary_dim {rotary_dim} must be even and >= 2")
    inv_freq = 1.0 / base ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
    angles = np.asarray(positions, dtype=np.float64)[..., None] * inv_freq
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rotary(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, interleaved: bool = True) -> np.ndarray:
    """x [batch, heads, seq, head_dim] with its first 2 * cos.shape[-1] channels rotated; float64."""
    x = np.asarray(x)
    cos = np.asarray(cos, dtype=np.float64)
    sin = np.asarray(sin, dtype=np.float64)
    if x.ndim != 4 or cos.ndim != 3 or sin.shape != cos.shape:
        raise ValueError(f"rotary: x {x.shape}, cos {cos.shape}, sin {sin.shape}: expected x [batch, heads, seq, "
                         "head_dim] and cos, sin [batch, seq, rotary_dim / 2]")
    batch, _, seq, head_dim = x.shape
    half = cos.shape[-1]
    if cos.shape[:2] != (batch, seq) or 2 * half > head_dim:
        raise ValueError(f"rotary: cos/sin {cos.shape} do not fit x {x.shape}: expected [{batch}, {seq}, "
                         f"<= {head_dim // 2}]")
    out = x.astype(np.float64)  # a copy: the tail keeps the input's values
    c, s = cos[:, None], sin[:, None]  # [batch, 1, seq, half]: every head of a token shares its row
    if interleaved:
        a, d = out[..., 0:2 * half:2].copy(), out[..., 1:2 * half:2].copy()
        out[..., 0:2 * half:2] = a * c - d * s
        out[..., 1:2 * half:2] = d * c + a * s
    else:
        a, d = out[..., :half].copy(), out[..., half:2 * half].copy()
        out[..., :half] = a * c - d * s
        out[..., half:2 * half] = d * c + a * s
    return out


def rotary(q: np.ndarray, k: np.ndarray, cos: np.ndarray, sin: np.ndarray, rotary_dim: int | None = None,
           interleaved: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(q_out, k_out) in float64. rotary_dim, when given, must be 2 * cos.shape[-1] (the tables' width)."""
    if rotary_dim is not None and rotary_dim != 2 * np.shape(cos)[-1]:
        raise ValueError(f"rotary: rotary_dim {rotary_dim} but cos/sin {np.shape(cos)} hold {np.shape(cos)[-1]} "
                         f"pairs: build the tables with rotary_tables(positions, {rotary_dim})")
    qs, ks = np.shape(q), np.shape(k)
    if len(qs) != 4 or len(ks) != 4 or (qs[0], qs[2], qs[3]) != (ks[0], ks[2], ks[3]):
        raise ValueError(f"rotary: q {np.shape(q)} and k {np.shape(k)} must agree on batch, seq and head_dim")
    return apply_rotary(q, cos, sin, interleaved), apply_rotary(k, cos, sin, interleaved)
