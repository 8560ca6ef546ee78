"""Numpy reference of the TrtglmResidualNorm plugin (plugins/residual_norm/residual_norm.cu).

Per row of the last axis (hidden), in float64:

    x      = input + residual, rounded to input's dtype     (residual_out; x = input without a residual)
    rms:   y = x / sqrt(mean(x^2) + eps) * gamma
    layer: y = (x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps) * gamma [+ beta]
    output = y, or with out_scale > 0: clamp(round_half_even(y / out_scale), -128, 127) as int8

Layouts are those of plugins/common/kernels.h (ResidualNormParams): input and residual [..., hidden] (rows = the
product of the leading dims), gamma and beta [hidden]. The kernels add input and residual in fp32 and round the sum
to the storage type before normalizing it (the sum is also residual_out, the next layer's residual); so does this
reference, with the input's own numpy dtype: float32, float16, or ml_dtypes.bfloat16 for bf16. The kernels round
to int8 with cvt.rni (CUDA's __float2int_rn: half to even), as np.rint does.

Returns float64 for a float output (tests compare the kernel's fp16/bf16 output against it; cast with
.astype(dtype) for the storage type), int8 for a quantized one.
"""

from __future__ import annotations

import numpy as np

KINDS = {"rms": 0, "layer": 1}  # NormKind in kernels.h


def quantize_int8(y: np.ndarray, out_scale: float) -> np.ndarray:
    """clamp(round_half_even(y / out_scale), -128, 127) as int8 (NaN gives 0, as cvt.rni does)."""
    if not out_scale > 0:
        raise ValueError(f"quantize_int8: out_scale {out_scale} must be > 0")
    q = np.rint(np.asarray(y, dtype=np.float64) / float(out_scale))
    return np.clip(np.nan_to_num(q, nan=0.0), -128, 127).astype(np.int8)


def residual_norm(input: np.ndarray, gamma: np.ndarray, residual: np.ndarray | None = None,
                  beta: np.ndarray | None = None, *, kind: str | int = "rms", eps: float = 1e-5,
                  out_scale: float = 0.0) -> tuple[np.ndarray, np.ndarray | None]:
    """(output, residual_out) of norm(input [+ residual]) over the last axis; residual_out None without residual.

    kind: "rms" or "layer" (or NormKind's 0 / 1); beta only with "layer"; out_scale > 0 quantizes the output to int8.
    """
    kind = {v: k for k, v in KINDS.items()}.get(kind, kind)
    if kind not in KINDS:
        raise ValueError(f"residual_norm: kind {kind!r}: give 'rms' or 'layer'")
    input = np.asarray(input)
    hidden = input.shape[-1] if input.ndim else 0
    if input.ndim < 1 or hidden < 1:
        raise ValueError(f"residual_norm: input {input.shape}: expected [..., hidden] with hidden >= 1")
    for name, t in (("gamma", gamma), ("beta", beta)):
        if t is not None and np.shape(t) != (hidden,):
            raise ValueError(f"residual_norm: {name} {np.shape(t)}: expected [{hidden}] (input {input.shape})")
    if beta is not None and kind != "layer":
        raise ValueError("residual_norm: beta is only for kind 'layer'")
    residual_out = None
    x = input
    if residual is not None:
        residual = np.asarray(residual)
        if residual.shape != input.shape:
            raise ValueError(f"residual_norm: residual {residual.shape} and input {input.shape} differ")
        # fp32 add (exact for two fp16/bf16 values), one rounding to the storage type: what the kernels do
        x = residual_out = (input.astype(np.float32) + residual.astype(np.float32)).astype(input.dtype)
    x = x.astype(np.float64)
    if kind == "layer":
        x = x - x.mean(axis=-1, keepdims=True)
    y = x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + float(eps)) * np.asarray(gamma, dtype=np.float64)
    if beta is not None:
        y = y + np.asarray(beta, dtype=np.float64)
    if out_scale:
        return quantize_int8(y, out_scale), residual_out
    return y, residual_out
