"""The numpy reference of the attention kernels against an independent formulation: torch's
scaled_dot_product_attention, with grouped-query heads expanded by repeat_interleave and the causal mask (with its
kv_len - q_len offset) built explicitly as a boolean mask.

The GPU tests (tests/gpu/test_kernels_attention.py) check the kernels against this reference, so these pin the
reference itself.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trtglm.plugins.reference.attention import attention

RNG = np.random.default_rng(11)


def _sdpa(q, k, v, scale, causal):
    q, k, v = (torch.from_numpy(np.asarray(a, dtype=np.float64)) for a in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    mask = None
    if causal:
        q_len, kv_len = q.shape[2], k.shape[2]
        rows = torch.arange(q_len)[:, None] + (kv_len - q_len)
        mask = torch.arange(kv_len)[None, :] <= rows  # True: attend
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).numpy()


def _inputs(batch, q_heads, kv_heads, q_len, kv_len, head_dim):
    q = RNG.standard_normal((batch, q_heads, q_len, head_dim)).astype(np.float32)
    k = RNG.standard_normal((batch, kv_heads, kv_len, head_dim)).astype(np.float32)
    v = RNG.standard_normal((batch, kv_heads, kv_len, head_dim)).astype(np.float32)
    return q, k, v


@pytest.mark.parametrize("shape", [
    (2, 4, 4, 9, 9, 16),     # MHA prefill
    (1, 8, 2, 7, 19, 8),     # GQA group 4, prefill after a cached prefix
    (2, 6, 1, 1, 33, 8),     # MQA decode
    (1, 32, 2, 1, 50, 16),   # GLM-style group 16 decode
    (1, 2, 1, 5, 5, 64),
])
@pytest.mark.parametrize("causal", [True, False])
def test_matches_torch_sdpa(shape, causal):
    q, k, v = _inputs(*shape)
    scale = 1.0 / math.sqrt(shape[-1])
    out = attention(q, k, v, scale=scale, causal=causal)
    assert out.dtype == np.float64 and out.shape == q.shape
    np.testing.assert_allclose(out, _sdpa(q, k, v, scale, causal), rtol=1e-10, atol=1e-12)


def test_default_scale_and_custom_scale():
    q, k, v = _inputs(1, 2, 2, 4, 6, 16)
    np.testing.assert_allclose(attention(q, k, v), attention(q, k, v, scale=0.25), rtol=1e-13)
    np.testing.assert_allclose(attention(q, k, v, scale=0.7), _sdpa(q, k, v, 0.7, True), rtol=1e-10, atol=1e-12)


def test_causal_square_is_torch_is_causal():
    q, k, v = _inputs(1, 3, 3, 8, 8, 16)
    want = F.scaled_dot_product_attention(*(torch.from_numpy(a.astype(np.float64)) for a in (q, k, v)),
                                          is_causal=True).numpy()
    np.testing.assert_allclose(attention(q, k, v), want, rtol=1e-10, atol=1e-12)


def test_causal_offset_first_query_sees_the_prefix_only():
    """Query 0 of 3 over 5 keys sees keys 0..2: the same as attending to the first three keys alone."""
    q, k, v = _inputs(1, 1, 1, 3, 5, 8)
    out = attention(q, k, v)
    alone = attention(q[:, :, :1], k[:, :, :3], v[:, :, :3], causal=False)
    np.testing.assert_allclose(out[:, :, :1], alone, rtol=1e-13)
    # decode: the last query of a causal prefill equals a q_len == 1 step over the same cache
    np.testing.assert_allclose(out[:, :, -1:], attention(q[:, :, -1:], k, v), rtol=1e-13)


def test_gqa_head_mapping():
    """Query head h reads kv head h // group: heads 0-3 the first kv head, 4-7 the second."""
    q, k, v = _inputs(1, 8, 2, 3, 4, 8)
    out = attention(q, k, v, causal=False)
    np.testing.assert_allclose(out[:, 5:6], attention(q[:, 5:6], k[:, 1:2], v[:, 1:2], causal=False), rtol=1e-13)
    np.testing.assert_allclose(out[:, 2:3], attention(q[:, 2:3], k[:, 0:1], v[:, 0:1], causal=False), rtol=1e-13)


def test_large_logits_are_stable():
    q, k, v = _inputs(1, 1, 1, 4, 4, 8)
    out = attention(q * 300, k * 300, v)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, _sdpa(q * 300, k * 300, v, 1 / math.sqrt(8), True), rtol=1e-9, atol=1e-12)


def test_query_without_keys_gets_zeros():
    """Causal with kv_len < q_len (the kernels reject it; the reference defines it): early queries see nothing."""
    q, k, v = _inputs(1, 1, 1, 4, 2, 8)
    out = attention(q, k, v)
    assert (out[0, 0, :2] == 0).all() and np.isfinite(out).all()


@pytest.mark.parametrize("shapes", [
    ((1, 4, 3, 8), (1, 3, 5, 8)),    # q_heads not a multiple of kv_heads
    ((1, 4, 3, 8), (1, 2, 5, 16)),   # head_dim differs
    ((4, 3, 8), (1, 2, 5, 8)),       # q not 4-d
])
def test_bad_shapes_say_what_is_wrong(shapes):
    qs, ks = shapes
    with pytest.raises(ValueError, match="attention"):
        attention(np.zeros(qs), np.zeros(ks), np.zeros(ks))
