"""The numpy references of the residual_norm and rotary kernels against independent formulations (torch).

The GPU tests (tests/gpu/test_kernels_norm_rotary.py) check the kernels against these references, so these pin the
references themselves: torch's rms_norm / layer_norm, torch.round (half to even) for int8, complex multiplication
for interleaved rotary, rotate_half for the halves layout, and GLM's interleaved partial-rotary formula.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trtglm.plugins.reference.norm import quantize_int8, residual_norm
from trtglm.plugins.reference.rotary import apply_rotary, rotary, rotary_tables

RNG = np.random.default_rng(7)


def _t(a) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float64))


# ---- residual_norm -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("hidden", [1, 7, 64, 4099])
def test_rms_matches_torch(hidden):
    x = RNG.standard_normal((3, 5, hidden)).astype(np.float32)
    gamma = RNG.uniform(0.5, 1.5, hidden).astype(np.float32)
    out, res = residual_norm(x, gamma, kind="rms", eps=1e-6)
    assert res is None and out.shape == x.shape and out.dtype == np.float64
    want = F.rms_norm(_t(x), (hidden,), _t(gamma), eps=1e-6).numpy()
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("with_beta", [False, True])
def test_layer_matches_torch(with_beta):
    hidden = 96
    x = (RNG.standard_normal((4, hidden)) * 3 + 10).astype(np.float32)  # a large mean: the two-pass variance
    gamma = RNG.uniform(0.5, 1.5, hidden).astype(np.float32)
    beta = RNG.standard_normal(hidden).astype(np.float32) if with_beta else None
    out, _ = residual_norm(x, gamma, beta=beta, kind=1, eps=1e-5)
    want = F.layer_norm(_t(x), (hidden,), _t(gamma), None if beta is None else _t(beta), eps=1e-5).numpy()
    np.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_residual_is_added_and_rounded_like_torch(dtype, kind):
    hidden = 40
    a = RNG.standard_normal((6, hidden)).astype(dtype)
    b = RNG.standard_normal((6, hidden)).astype(dtype)
    gamma = RNG.uniform(0.5, 1.5, hidden).astype(dtype)
    out, res = residual_norm(a, gamma, residual=b, kind=kind)
    torch_dtype = {np.float32: torch.float32, np.float16: torch.float16, ml_dtypes.bfloat16: torch.bfloat16}[dtype]
    ta = torch.from_numpy(a.astype(np.float32)).to(torch_dtype)
    tb = torch.from_numpy(b.astype(np.float32)).to(torch_dtype)
    summed = ta + tb  # torch rounds the sum to the storage type, as the kernels do
    assert res.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(res.astype(np.float32), summed.float().numpy())
    norm = F.rms_norm if kind == "rms" else F.layer_norm
    want = norm(summed.double(), (hidden,), _t(gamma.astype(np.float32)), eps=1e-5).numpy()
    np.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-10)


def test_int8_output_rounds_half_to_even_and_clamps():
    y = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 2.4999, 2.5001, 126.6, 127.5, 300.0, -128.4, -128.6, -1e9, np.nan])
    got = quantize_int8(y * 0.25, 0.25)  # exact: 0.25 is a power of two
    assert got.dtype == np.int8
    np.testing.assert_array_equal(got, [0, 2, 2, 0, -2, -2, 2, 3, 127, 127, 127, -128, -128, -128, 0])
    want = torch.clamp(torch.round(torch.from_numpy(y[:-1])), -128, 127).to(torch.int8).numpy()
    np.testing.assert_array_equal(got[:-1], want)


def test_int8_residual_norm_is_the_quantized_float_output():
    hidden = 64
    x = RNG.standard_normal((8, hidden)).astype(np.float16)
    r = RNG.standard_normal((8, hidden)).astype(np.float16)
    gamma = RNG.uniform(0.5, 1.5, hidden).astype(np.float16)
    beta = RNG.standard_normal(hidden).astype(np.float16)
    y, res = residual_norm(x, gamma, residual=r, beta=beta, kind="layer")
    q, res_q = residual_norm(x, gamma, residual=r, beta=beta, kind="layer", out_scale=0.02)
    np.testing.assert_array_equal(res, res_q)
    np.testing.assert_array_equal(q, np.clip(np.rint(y / 0.02), -128, 127).astype(np.int8))
    assert (q == 127).any() or (q == -128).any() or np.abs(y / 0.02).max() < 127


@pytest.mark.parametrize("bad", [
    dict(kind="batch"), dict(gamma_shape=(5,)), dict(beta=True, kind="rms"), dict(residual_shape=(2, 3)),
    dict(out_scale=-1.0)])
def test_residual_norm_rejects_bad_arguments(bad):
    x = np.zeros((2, 4), np.float32)
    gamma = np.ones(bad.get("gamma_shape", (4,)), np.float32)
    residual = np.zeros(bad["residual_shape"], np.float32) if "residual_shape" in bad else None
    beta = np.zeros(4, np.float32) if bad.get("beta") else None
    with pytest.raises(ValueError):
        residual_norm(x, gamma, residual=residual, beta=beta, kind=bad.get("kind", "rms"),
                      out_scale=bad.get("out_scale", 0.0))


# ---- rotary ----------------------------------------------------------------------------------------------------------

def _inputs(batch=2, q_heads=4, kv_heads=2, seq=5, head_dim=16, rotary_dim=16):
    q = RNG.standard_normal((batch, q_heads, seq, head_dim)).astype(np.float32)
    k = RNG.standard_normal((batch, kv_heads, seq, head_dim)).astype(np.float32)
    positions = RNG.integers(0, 4096, (batch, seq))
    cos, sin = rotary_tables(positions, rotary_dim)
    return q, k, cos, sin, positions


def test_tables_follow_the_rope_frequencies():
    positions = np.array([[0, 1, 17], [5, 100, 4095]])
    cos, sin = rotary_tables(positions, 8, base=500.0)
    assert cos.shape == (2, 3, 4) and cos.dtype == np.float32
    angle = positions[..., None] * 500.0 ** (-np.arange(4) * 2 / 8)
    np.testing.assert_allclose(cos, np.cos(angle), atol=1e-7)
    np.testing.assert_allclose(sin, np.sin(angle), atol=1e-7)


def test_interleaved_is_complex_multiplication():
    q, k, cos, sin, _ = _inputs()
    q_out, k_out = rotary(q, k, cos, sin, rotary_dim=16, interleaved=True)
    for x, got in ((q, q_out), (k, k_out)):
        z = torch.view_as_complex(_t(x).reshape(*x.shape[:-1], -1, 2).contiguous())
        turn = torch.complex(_t(cos), _t(sin))[:, None]  # e^(i angle), as the float32 tables hold it
        want = torch.view_as_real(z * turn).reshape(x.shape).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_halves_is_rotate_half():
    q, k, cos, sin, _ = _inputs()
    got, _ = rotary(q, k, cos, sin, interleaved=False)
    x = _t(q)
    c = torch.cat([_t(cos), _t(cos)], dim=-1)[:, None]
    s = torch.cat([_t(sin), _t(sin)], dim=-1)[:, None]
    x1, x2 = x[..., :8], x[..., 8:]
    want = (x * c + torch.cat([-x2, x1], dim=-1) * s).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_glm_partial_rotary_rotates_half_the_head_interleaved_and_copies_the_rest():
    head_dim, rotary_dim = 16, 8
    q, k, cos, sin, _ = _inputs(head_dim=head_dim, rotary_dim=rotary_dim, kv_heads=1)
    q_out, k_out = rotary(q, k, cos, sin, rotary_dim=rotary_dim, interleaved=True)
    for x, got in ((q, q_out), (k, k_out)):
        # GLM's formula: cos/sin repeated per pair, rotate_half over interleaved pairs, the tail concatenated back
        t = _t(x)
        c = _t(cos).repeat_interleave(2, dim=-1)[:, None]
        s = _t(sin).repeat_interleave(2, dim=-1)[:, None]
        rot, tail = t[..., :rotary_dim], t[..., rotary_dim:]
        turned = torch.stack((-rot[..., 1::2], rot[..., 0::2]), dim=-1).flatten(-2)
        want = torch.cat([rot * c + turned * s, tail], dim=-1).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(got[..., rotary_dim:], x[..., rotary_dim:])


def test_rotary_at_position_zero_is_identity_and_keeps_norms():
    q, _, cos, sin, _ = _inputs()
    zero_cos, zero_sin = rotary_tables(np.zeros((2, 5)), 16)
    np.testing.assert_array_equal(apply_rotary(q, zero_cos, zero_sin, interleaved=False), q)
    out = apply_rotary(q, cos, sin)
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(q, axis=-1), rtol=1e-6)


def test_rotary_rejects_mismatched_shapes():
    q, k, cos, sin, _ = _inputs()
    with pytest.raises(ValueError, match="rotary_dim 8"):
        rotary(q, k, cos, sin, rotary_dim=8)
    with pytest.raises(ValueError):
        rotary(q, k[:, :, :3], cos, sin)
    with pytest.raises(ValueError):
        apply_rotary(q, cos[:1], sin[:1])
    with pytest.raises(ValueError):
        apply_rotary(q[..., :8], cos, sin)  # 16 rotary channels do not fit a head of 8
