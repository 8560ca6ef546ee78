"""Ahead-of-time launches of trtglm's kernels: for an op, its attributes and its input shapes, the kernel entry
point, its PTX and its launch (grid, block, shared memory, int32 scalar arguments).

These are plain functions, so they run and are tested without TensorRT: the GPU tests launch what they return
through cupy, and trtglm.plugins.tensorrt_aot hands the same answers to TensorRT's `tensorrt.plugin.aot_impl`
(with symbolic dimensions: the shape arithmetic here only adds, multiplies and divides through `cdiv`, which
TensorRT's ShapeExprs support, and never branches on a dynamic dimension). Kernel arguments follow TensorRT's AOT
convention: input pointers, the scalars, output pointers; a float scalar is passed as its IEEE-754 bits.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Callable

from trtglm.errors import ConfigError
from trtglm.plugins.ptx import compile_ptx

Dim = Any  # an int, or a TensorRT ShapeExpr when TensorRT builds the engine
SUFFIX = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
VECTOR = {"float32": 4, "float16": 8, "bfloat16": 8}  # elements per 16-byte access


def int_cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class KernelLaunch:
    kernel: str  # the extern "C" entry point
    ptx: str
    grid: tuple[Dim, Dim, Dim]
    block: tuple[int, int, int]
    shared_mem: int
    scalars: tuple[Dim, ...]  # int32 arguments between the input and the output pointers


def float_bits(value: float) -> int:
    """A float32's IEEE-754 bits as a signed int32 (how a float scalar reaches the kernel)."""
    return struct.unpack("<i", struct.pack("<f", float(value)))[0]


def residual_norm(dtype: str, shape: tuple[Dim, ...], kind: int = 0, eps: float = 1e-5, has_residual: int = 0,
                  has_beta: int = 0, out_scale: float = 0.0, arch: str = "sm_80",
                  cdiv: Callable = int_cdiv) -> KernelLaunch:
    """TrtglmResidualNorm over the last axis of `shape` (its size must be static: the weights fix it)."""
    _dtype(dtype)
    hidden = shape[-1]
    if not isinstance(hidden, int) or not 1 <= hidden:
        raise ConfigError(f"TrtglmResidualNorm: hidden size {hidden!r} must be a static positive integer")
    if kind not in (0, 1) or (has_beta and kind != 1):
        raise ConfigError("TrtglmResidualNorm: kind is 0 (RMSNorm) or 1 (LayerNorm); beta only with LayerNorm")
    rows = shape[0]
    for d in shape[1:-1]:
        rows = rows * d
    variant = ("add_" if has_residual else "") + ("rms" if kind == 0 else "layer_bias" if has_beta else "layer")
    variant += "_i8" if out_scale > 0 else ""
    scalars = (rows, hidden, float_bits(eps)) + ((float_bits(out_scale),) if out_scale > 0 else ())
    threads = 32 * int_cdiv(hidden, 512)  # 16 values of the row per thread, kept in registers
    return KernelLaunch(f"trtglm_residual_norm_{variant}_{SUFFIX[dtype]}", compile_ptx("residual_norm", arch),
                        (rows, 1, 1), (threads, 1, 1), 0, scalars)


def rotary(dtype: str, q_shape: tuple[Dim, ...], k_shape: tuple[Dim, ...], rotary_dim: int = 0, interleaved: int = 1,
           arch: str = "sm_80", cdiv: Callable = int_cdiv) -> KernelLaunch:
    """TrtglmRotary on q [batch, q_heads, seq, head_dim] and k [batch, kv_heads, seq, head_dim] (head_dim static)."""
    _dtype(dtype)
    batch, q_heads, seq, head_dim = q_shape
    kv_heads = k_shape[1]
    if not isinstance(head_dim, int):
        raise ConfigError(f"TrtglmRotary: head_dim {head_dim!r} must be static")
    rot = rotary_dim or head_dim
    if rot % 2 or rot > head_dim:
        raise ConfigError(f"TrtglmRotary: rotary_dim {rot} must be even and at most head_dim {head_dim}")
    threads = 256
    elements = batch * (q_heads + kv_heads) * seq * head_dim
    grid = cdiv(elements, VECTOR[dtype] * threads)  # one 16-byte vector per thread; the kernel strides the rest
    name = f"trtglm_rotary_{'interleaved' if interleaved else 'halves'}_{SUFFIX[dtype]}"
    return KernelLaunch(name, compile_ptx("rotary", arch), (grid, 1, 1), (threads, 1, 1), 0,
                        (batch, q_heads, kv_heads, seq, head_dim, rot))


def _dtype(dtype: str) -> None:
    if dtype not in SUFFIX:
        raise ConfigError(f"dtype {dtype!r}: the kernels take {', '.join(SUFFIX)}")


PREFILL_ROWS = 128  # queries per prefill block
PREFILL_SMEM = {64: 49152, 128: 65536}  # (128 + 2 * BN) * D * 2 bytes, BN = 128 (d64) | 64 (d128)
DECODE_SMEM = {64: 32768, 128: 65536}
DECODE_GROUP = 16  # query heads of one GQA group per decode block (one mma tile)


def attention(dtype: str, q_shape: tuple[Dim, ...], k_shape: tuple[Dim, ...], scale: float = 0.0, causal: int = 1,
              decode: bool | None = None, arch: str = "sm_80", cdiv: Callable = int_cdiv) -> KernelLaunch:
    """TrtglmAttention on q [batch, q_heads, q_len, D], k/v [batch, kv_heads, kv_len, D]; D (64 or 128) and the head
    counts static. decode: the one-split decode kernel (q_len == 1: TensorRT's AOT plugins launch one kernel and
    have no workspace, so no split-KV); None: decided by q_len when it is static, else prefill."""
    if dtype not in ("float16", "bfloat16"):
        raise ConfigError(f"TrtglmAttention: dtype {dtype!r}: the kernels take float16, bfloat16")
    batch, q_heads, q_len, head_dim = q_shape
    kv_heads, kv_len = k_shape[1], k_shape[2]
    if head_dim not in (64, 128):
        raise ConfigError(f"TrtglmAttention: head_dim {head_dim!r}: the kernels take 64 or 128")
    if not (isinstance(q_heads, int) and isinstance(kv_heads, int)) or q_heads % kv_heads:
        raise ConfigError(f"TrtglmAttention: q_heads {q_heads!r} must be a static multiple of kv_heads {kv_heads!r}")
    scale_bits = float_bits(scale or 1.0 / head_dim ** 0.5)
    decode = q_len == 1 if decode is None else decode
    suffix = f"d{head_dim}_{SUFFIX[dtype]}"
    ptx = compile_ptx("attention", arch)
    if decode:
        blocks = batch * (kv_heads * int_cdiv(q_heads // kv_heads, DECODE_GROUP))
        return KernelLaunch(f"trtglm_attention_decode1_{suffix}", ptx, (blocks, 1, 1), (128, 1, 1),
                            DECODE_SMEM[head_dim], (batch, q_heads, kv_heads, kv_len, scale_bits))
    return KernelLaunch(f"trtglm_attention_prefill_{suffix}", ptx, (batch * q_heads, cdiv(q_len, PREFILL_ROWS), 1),
                        (128, 1, 1), PREFILL_SMEM[head_dim],
                        (batch, q_heads, kv_heads, q_len, kv_len, scale_bits, int(causal)))
