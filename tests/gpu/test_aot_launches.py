"""The ahead-of-time launch descriptions (trtglm.plugins.aot) launched as TensorRT's AOT plugins would launch them:
the kernel they name, from the PTX they carry, with their grid, block, shared memory and scalars, inputs before the
scalars and outputs after. Each result is compared with the numpy reference (needs a CUDA GPU and cupy)."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

from trtglm.plugins import aot, reference

pytestmark = pytest.mark.cuda

DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32}
TOL = {"float16": 2e-3, "bfloat16": 1e-2, "float32": 1e-5}  # bf16: rounding the output alone costs up to 3.9e-3


@pytest.fixture(scope="module")
def cp():
    import cupy

    return cupy


@pytest.fixture(scope="module")
def arch(cp) -> str:
    return "sm_90" if int(cp.cuda.Device().compute_capability) >= 90 else "sm_80"


def _dev(cp, a):
    return cp.asarray(a.view(np.uint16) if a.dtype == ml_dtypes.bfloat16 else a)


def _host(cp, x, dtype):
    a = cp.asnumpy(x)
    return a.view(ml_dtypes.bfloat16) if dtype == ml_dtypes.bfloat16 else a


def _run(cp, launch: aot.KernelLaunch, inputs: list, outputs: list, tmp_path) -> None:
    path = tmp_path / f"{launch.kernel}.ptx"
    path.write_text(launch.ptx)
    kernel = cp.RawModule(path=str(path)).get_function(launch.kernel)
    if launch.shared_mem > 48 * 1024:
        kernel.max_dynamic_shared_size_bytes = launch.shared_mem
    args = (*inputs, *(np.int32(s) for s in launch.scalars), *outputs)
    kernel(launch.grid, launch.block, args, shared_mem=launch.shared_mem)
    cp.cuda.runtime.deviceSynchronize()


def _rel(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert np.isfinite(out).all()
    return float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("hidden", [64, 4096, 5000])
def test_residual_rmsnorm_launch(cp, arch, dtype, hidden, tmp_path):
    dt = DTYPES[dtype]
    rng = np.random.default_rng(0)
    x, r = (rng.standard_normal((3, 5, hidden)).astype(dt) for _ in range(2))
    gamma = (1 + 0.1 * rng.standard_normal(hidden)).astype(dt)
    launch = aot.residual_norm(dtype, x.shape, kind=0, eps=1e-6, has_residual=1, arch=arch)
    out, res_out = (cp.empty(_dev(cp, x).shape, _dev(cp, x).dtype) for _ in range(2))
    _run(cp, launch, [_dev(cp, x), _dev(cp, r), _dev(cp, gamma)], [out, res_out], tmp_path)
    ref, ref_res = reference.residual_norm(x, gamma, residual=r, kind="rms", eps=1e-6)
    assert _rel(_host(cp, out, dt), ref) < TOL[dtype] and _rel(_host(cp, res_out, dt), ref_res) < TOL[dtype]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("interleaved", [1, 0])
def test_rotary_launch(cp, arch, dtype, interleaved, tmp_path):
    dt = DTYPES[dtype]
    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 8, 13, 128)).astype(dt)
    k = rng.standard_normal((2, 2, 13, 128)).astype(dt)
    cos, sin = reference.rotary_tables(np.tile(np.arange(13), (2, 1)), 64)
    launch = aot.rotary(dtype, q.shape, k.shape, rotary_dim=64, interleaved=interleaved, arch=arch)
    q_out, k_out = cp.empty(_dev(cp, q).shape, _dev(cp, q).dtype), cp.empty(_dev(cp, k).shape, _dev(cp, k).dtype)
    _run(cp, launch, [_dev(cp, q), _dev(cp, k), cp.asarray(cos), cp.asarray(sin)], [q_out, k_out], tmp_path)
    ref_q, ref_k = reference.rotary(q, k, cos, sin, rotary_dim=64, interleaved=bool(interleaved))
    assert _rel(_host(cp, q_out, dt), ref_q) < TOL[dtype] and _rel(_host(cp, k_out, dt), ref_k) < TOL[dtype]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("d, q_len, kv_len", [(128, 200, 333), (64, 1, 777), (128, 1, 4096)])
def test_attention_launch(cp, arch, dtype, d, q_len, kv_len, tmp_path):
    dt = DTYPES[dtype]
    rng = np.random.default_rng(2)
    q = rng.standard_normal((2, 32, q_len, d)).astype(dt)
    k, v = (rng.standard_normal((2, 2, kv_len, d)).astype(dt) for _ in range(2))
    launch = aot.attention(dtype, q.shape, k.shape, causal=1, arch=arch)
    out = cp.empty(_dev(cp, q).shape, _dev(cp, q).dtype)
    _run(cp, launch, [_dev(cp, q), _dev(cp, k), _dev(cp, v)], [out], tmp_path)
    ref = reference.attention(*(a.astype(np.float64) for a in (q, k, v)), 1 / math.sqrt(d), True)
    assert _rel(_host(cp, out, dt), ref) < TOL[dtype]
