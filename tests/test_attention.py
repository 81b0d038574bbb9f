"""The attention functions (model/attention.py) against float64 NumPy written here: sliding windows,
soft-caps and an explicit scale, causal and bidirectional, packed segments, grouped-query heads, and the
cached decoder (query slots offset by the cache index). Kernel selection off their platforms."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from qkv.model.attention import Mask, attention_mask, dot_product_attention, reference_attention


def np_mask_loops(q_slots, q_seg, k_seg, window=0):
    """[b, t, s] by explicit loops: same segment; causal (j <= i) when q_slots is given, and with a
    window W: i - W < j (causal) or |i - j| < W (bidirectional, query i at slot i)."""
    b, t = q_seg.shape
    s = k_seg.shape[1]
    mask = np.zeros((b, t, s), bool)
    for r in range(b):
        for qi in range(t):
            i = qi if q_slots is None else int(q_slots[r, qi])
            for j in range(s):
                ok = q_seg[r, qi] == k_seg[r, j]
                if q_slots is not None:
                    ok &= j <= i and (not window or i - window < j)
                elif window:
                    ok &= abs(i - j) < window
                mask[r, qi, j] = ok
    return mask


def np_attention(q, k, v, mask, scale=None, softcap=0.0):
    """softmax(cap(scale · q kᵀ)) v in float64; kv head j serves query heads j*g .. j*g+g-1."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    scores = np.einsum("bthe,bshe->bhts", q, k) * (1 / np.sqrt(q.shape[-1]) if scale is None else scale)
    if softcap:
        scores = softcap * np.tanh(scores / softcap)
    scores = np.where(np.asarray(mask)[:, None], scores, -np.inf)
    scores = scores - scores.max(-1, keepdims=True)
    probs = np.exp(scores)
    return np.einsum("bhts,bshe->bthe", probs / probs.sum(-1, keepdims=True), v)


T = 12
SEGMENTS = np.array([[1] * 9 + [2] * 3, [1] * 10 + [0] * 2], np.int32)  # packed documents; padding
SLOTS = np.broadcast_to(np.arange(T, dtype=np.int32), (2, T))


@pytest.mark.parametrize("window", [0, 1, 4])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_attention_mask_window_matches_loops(window, causal):
    slots = SLOTS if causal else None
    got = np.asarray(Mask(None if slots is None else jnp.asarray(slots), jnp.asarray(SEGMENTS),
                          jnp.asarray(SEGMENTS)).dense(window))
    np.testing.assert_array_equal(got, np_mask_loops(slots, SEGMENTS, SEGMENTS, window))
    if causal and window:  # each query sees at most W keys: itself and the W - 1 before it
        assert got.sum(-1).max() == window


def test_window_rule_is_transformers_sliding_window_causal():
    from transformers.masking_utils import sliding_window_causal_mask_function
    import torch

    fn = sliding_window_causal_mask_function(4)
    want = np.array([[bool(fn(0, 0, torch.tensor(i), torch.tensor(j))) for j in range(T)] for i in range(T)])
    ones = jnp.ones((1, T), jnp.int32)
    got = np.asarray(attention_mask(jnp.asarray(SLOTS[:1]), ones, ones, window=4))[0]
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("impl", ["xla", "reference", "auto"])
@pytest.mark.parametrize("window, softcap, scale", [(0, 0.0, None), (4, 0.0, None), (0, 2.0, None),
                                                    (5, 1.5, 0.7), (0, 0.0, 0.3)])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_dot_product_attention_matches_numpy(impl, window, softcap, scale, causal):
    b, h, kv, e = 2, 4, 2, 8
    rng = np.random.default_rng(window * 10 + int(softcap * 10))
    q = 2 * rng.standard_normal((b, T, h, e)).astype(np.float32)  # large enough for the cap to matter
    k = 2 * rng.standard_normal((b, T, kv, e)).astype(np.float32)
    v = rng.standard_normal((b, T, kv, e)).astype(np.float32)
    slots = SLOTS if causal else None
    mask = Mask(None if slots is None else jnp.asarray(slots), jnp.asarray(SEGMENTS), jnp.asarray(SEGMENTS))
    want = np_attention(q, k, v, np_mask_loops(slots, SEGMENTS, SEGMENTS, window), scale, softcap)
    got = dot_product_attention(q, k, v, mask, impl, scale=scale, window=window, softcap=softcap)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=0)
    # the dense mask (holding the window) gives the same numbers, and so does the reference given it
    dense = mask.dense(window)
    np.testing.assert_allclose(np.asarray(dot_product_attention(q, k, v, dense, impl, scale=scale, softcap=softcap)),
                               want, atol=2e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(reference_attention(q, k, v, dense, scale=scale, softcap=softcap)),
                               want, atol=2e-5, rtol=0)
    if softcap:  # the cap changes the answer (the test is not satisfied by an uncapped path)
        assert np.abs(want - np_attention(q, k, v, np_mask_loops(slots, SEGMENTS, SEGMENTS, window), scale)).max() > 1e-3


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_cached_decoder_window_sees_the_last_w_slots(impl):
    """One query at cache index 9 over a 16-slot buffer (slots 10.. empty, segment 0), window 4:
    keys 6..9 only; and a 3-token chunk at index 7 (slots 7, 8, 9)."""
    s, h, e, window = 16, 2, 8, 4
    rng = np.random.default_rng(1)
    k_seg = np.array([[1] * 10 + [0] * 6], np.int32)
    k = rng.standard_normal((1, s, h, e)).astype(np.float32)
    v = rng.standard_normal((1, s, h, e)).astype(np.float32)
    for index, t in ((9, 1), (7, 3)):
        q = rng.standard_normal((1, t, h, e)).astype(np.float32)
        q_slots = index + np.arange(t, dtype=np.int32)[None]
        mask = Mask(jnp.asarray(q_slots), jnp.ones((1, t), jnp.int32), jnp.asarray(k_seg))
        np_m = np_mask_loops(q_slots, np.ones((1, t), np.int32), k_seg, window)
        assert np_m[0, -1].nonzero()[0].tolist() == [6, 7, 8, 9]
        got = dot_product_attention(q, k, v, mask, impl, window=window, softcap=3.0, scale=0.5)
        np.testing.assert_allclose(np.asarray(got), np_attention(q, k, v, np_m, 0.5, 3.0), atol=2e-5, rtol=0)
