"""The attention kernels' real bodies (attention_prefill/decode/tile.cuh), compiled by g++ and run on the CPU under
tests/emulator/attention_emu.cpp, a warp emulator that implements the PTX primitives of attention_mma.cuh
(ldmatrix, mma.m16n8k16 fragment layouts, cp.async groups with destinations poisoned until waited on, barriers with
deadlock checks). It is not the GPU: it checks the kernels' index math, tiling, masking, pipelining and online
softmax in CI, where no GPU is; tests/gpu checks the hardware. Compared with the numpy reference at the GPU
tests' tolerances (fp16 2e-3, bf16 1e-2: rounding the output to bf16 alone costs up to 3.9e-3)."""

from __future__ import annotations

import ctypes
import math
import shutil
import subprocess
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from trtglm.plugins.reference import attention

ROOT = Path(__file__).resolve().parents[2]
P, I, F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("g++ not found")
    cuda_include = Path("/usr/local/cuda/include")
    if not (cuda_include / "cuda_fp16.h").is_file():
        pytest.skip("CUDA headers (cuda_fp16.h) not found in /usr/local/cuda/include")
    lib = tmp_path_factory.mktemp("emu") / "libattnemu.so"
    subprocess.run(["g++", "-std=c++20", "-O2", "-Wno-unknown-pragmas", "-shared", "-fPIC", f"-I{cuda_include}",
                    f"-I{ROOT / 'plugins'}", str(ROOT / "tests" / "emulator" / "attention_emu.cpp"), "-o", str(lib)],
                   check=True, capture_output=True)
    emu = ctypes.CDLL(str(lib))
    emu.emu_prefill.argtypes = [I, I, I, I, P, P, P, P, I, I, I, I, I, F, I]
    emu.emu_decode.argtypes = [I, I, I, I, P, P, P, P, P, I, I, I, I, F, I]
    emu.emu_combine.argtypes = [I, I, I, P, P, I, I, I]
    return emu


CASES = [  # d, bf16, batch, q_heads, kv_heads, q_len, kv_len, causal, num_splits, amplitude
    (64, False, 1, 2, 1, 130, 130, True, 1, 1.0),
    (128, True, 1, 2, 1, 200, 333, True, 1, 1.0),  # past cache: causal offset; kv not a multiple of the tile
    (64, True, 2, 4, 2, 129, 250, False, 1, 1.0),
    (128, False, 1, 1, 1, 2, 17, True, 1, 1.0),  # tiny
    (128, False, 1, 4, 1, 257, 257, True, 1, 3.0),  # peaky softmax
    (128, False, 2, 32, 2, 1, 300, True, 1, 1.0),  # decode, one split (the AOT decode1 path)
    (128, True, 1, 32, 2, 1, 1000, True, 3, 1.0),  # decode, split KV + combine
    (64, False, 2, 8, 8, 1, 77, True, 2, 1.0),  # MHA; an empty split
    (64, True, 1, 40, 2, 1, 513, True, 4, 1.0),  # group 20: two head groups (16 + 4)
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "d{}-{}-b{}-hq{}-hkv{}-q{}-kv{}-c{}-s{}".format(
    c[0], "bf16" if c[1] else "f16", *c[2:9]))
def test_attention_kernel_bodies_match_the_reference(emu, case):
    d, bf16, batch, q_heads, kv_heads, q_len, kv_len, causal, splits, amp = case
    dtype = ml_dtypes.bfloat16 if bf16 else np.float16
    rng = np.random.default_rng(0)
    q, k, v = ((rng.standard_normal((batch, h, n, d)) * a).astype(dtype) for h, n, a in
               ((q_heads, q_len, amp), (kv_heads, kv_len, amp), (kv_heads, kv_len, 1.0)))
    out = np.full((batch, q_heads, q_len, d), np.nan, dtype)
    scale = 1.0 / math.sqrt(d)
    ptr = lambda a: a.ctypes.data  # noqa: E731
    if q_len > 1:
        rc = emu.emu_prefill(d, int(bf16), batch * q_heads, (q_len + 127) // 128, ptr(q), ptr(k), ptr(v), ptr(out),
                             batch, q_heads, kv_heads, q_len, kv_len, scale, int(causal))
    else:
        partial = np.full(splits * batch * q_heads * (d + 2), np.nan, np.float32)
        gx = batch * kv_heads * ((q_heads // kv_heads + 15) // 16)
        rc = emu.emu_decode(d, int(bf16), gx, splits, ptr(q), ptr(k), ptr(v), ptr(partial), ptr(out), batch, q_heads,
                            kv_heads, kv_len, scale, splits)
        if splits > 1:
            rc |= emu.emu_combine(d, int(bf16), (batch * q_heads + 3) // 4, ptr(partial), ptr(out), batch, q_heads,
                                  splits)
    assert rc == 0
    ref = attention(*(x.astype(np.float64) for x in (q, k, v)), scale, causal)
    got = out.astype(np.float64)
    assert np.isfinite(got).all()
    assert np.abs(got - ref).max() / np.abs(ref).max() < (1e-2 if bf16 else 2e-3)
