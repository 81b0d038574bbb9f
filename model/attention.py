"""Multi-head (and grouped-query) attention: causal or bidirectional self-attention, and cross-attention.

softmax(Q Kᵀ / √d_k) · V per head, heads concatenated and projected back. One module serves all
three uses: self-attention projects queries, keys and values from the same sequence (causal in a
decoder, bidirectional in an encoder, the mask decides); cross-attention takes its keys and values
from another sequence (the encoder's output), projected once with ``memory_kv`` and reused at every
decoding step. The explicit einsum ``reference_attention`` is the readable definition and what
tests compare against; ``model.attention_impl`` chooses what runs:

- ``xla``: ``jax.nn.dot_product_attention(implementation="xla")``, which materialises the
  ``[b, h, t, s]`` scores (quadratic memory in T).
- ``splash``: the Pallas TPU splash flash-attention kernel (model/flash.py), O(T) memory.
- ``cudnn``: on GPUs, cuDNN's fused attention for rows of one document, else the Pallas GPU flash
  kernel with segment ids (model/flash.py), O(T) memory.
- ``auto`` (default): splash when compiling for TPU, cudnn on GPU, xla on CPU.

The flash kernels serve training-time self-attention (causal or bidirectional, packed segments,
padding, grouped-query heads); decoding over a cache and cross-attention always run on ``xla``,
and so do shapes the kernel cannot tile (``flash.splash_supported``).

Shape suffixes: b batch, t query length, s key length, d model width, h query heads, k kv heads,
g query heads per kv head, e head size.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from typing import NamedTuple

from . import flash
from .config import ModelConfig
from .layers import apply_rope, dense, param, rms_normalize, write_rows


def attention_mask(q_slots_bt: jax.Array | None, q_segments_bt: jax.Array, k_segments_bs: jax.Array) -> jax.Array:
    """Boolean [b, t, s]: query at slot i sees key slot j iff j <= i and both lie in the same segment.

    Segments keep packed documents apart (and padding, segment 0, to itself); slots are positions in
    the key buffer, so the same rule serves training (slots 0..T-1) and cached decoding. With
    ``q_slots_bt=None`` the mask is not causal: segments alone decide (encoders, cross-attention,
    where a target example's segment id names its source example).
    """
    same_segment_bts = k_segments_bs[:, None, :] == q_segments_bt[:, :, None]
    if q_slots_bt is None:
        return same_segment_bts
    k_slots_s = jnp.arange(k_segments_bs.shape[1])
    causal_bts = k_slots_s[None, None, :] <= q_slots_bt[:, :, None]
    return causal_bts & same_segment_bts


class Mask(NamedTuple):
    """The parts of ``attention_mask`` (one rule), kept apart so flash kernels can read them.

    ``dense()`` is the boolean [b, t, s] of the rule; kernels use q_slots (None: not causal) and the
    segment ids directly. Where a dense array is passed instead, attention runs on XLA.
    """

    q_slots_bt: jax.Array | None
    q_segments_bt: jax.Array
    k_segments_bs: jax.Array

    def dense(self) -> jax.Array:
        return attention_mask(self.q_slots_bt, self.q_segments_bt, self.k_segments_bs)


def select_impl(impl: str, t: int, s: int, e: int) -> str:
    """What ``model.attention_impl`` runs for self-attention of t queries over s keys of head size e."""
    platform = flash.target_platform()
    if impl == "auto":
        impl = {"tpu": "splash", "gpu": "cudnn"}.get(platform, "xla")
    if impl == "splash" and platform == "tpu" and not flash.splash_supported(t, s, e):
        return "xla"
    return impl


def reference_attention(q_bthe: jax.Array, k_bske: jax.Array, v_bske: jax.Array, mask_bts: jax.Array,
                        with_weights: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """The textbook definition, written out with einsums (float32 softmax); ``with_weights`` also returns
    the softmax weights [b, h, t, s] (what ``qkv explain`` draws)."""
    b, t, h, e = q_bthe.shape
    k_heads = k_bske.shape[2]
    q_btkge = q_bthe.reshape(b, t, k_heads, h // k_heads, e)
    scores = jnp.einsum("btkge,bske->bkgts", q_btkge, k_bske).astype(jnp.float32) / math.sqrt(e)
    scores = jnp.where(mask_bts[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out_btkge = jnp.einsum("bkgts,bske->btkge", probs.astype(v_bske.dtype), v_bske)
    out_bthe = out_btkge.reshape(b, t, h, e)
    return (out_bthe, probs.reshape(b, h, t, -1)) if with_weights else out_bthe


def dot_product_attention(q_bthe, k_bske, v_bske, mask: Mask | jax.Array, impl: str) -> jax.Array:
    """Attention by ``impl``; a flash kernel only for self-attention given as a ``Mask`` whose query
    slots are 0..T-1 (training and prefill from an empty cache), XLA otherwise."""
    if isinstance(mask, Mask):
        impl = select_impl(impl, q_bthe.shape[1], k_bske.shape[1], q_bthe.shape[3])
        if impl in flash.KERNELS:
            return flash.KERNELS[impl](q_bthe, k_bske, v_bske, mask.q_segments_bt, mask.k_segments_bs,
                                       causal=mask.q_slots_bt is not None)
        mask = mask.dense()
    if impl == "reference":
        return reference_attention(q_bthe, k_bske, v_bske, mask)
    return jax.nn.dot_product_attention(q_bthe, k_bske, v_bske, mask=mask[:, None], implementation="xla")


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, h, k, e = cfg.d_model, cfg.n_heads, cfg.num_kv_heads, cfg.head_size
        std, wd = cfg.init_std, cfg.weight_dtype
        self.dtype, self.impl, self.use_rope = cfg.compute_dtype, cfg.attention_impl, cfg.positions == "rope"
        self.qk_eps = cfg.norm_eps if cfg.qk_norm else None  # QK-norm: queries and keys RMS-normalised per head
        self.sow_weights = False  # qkv explain sets it (model.set_attributes): keep the softmax weights
        self.wq = param(rngs, (d, h, e), ("embed", "heads", "head_dim"), std, wd)
        self.wk = param(rngs, (d, k, e), ("embed", "kv_heads", "head_dim"), std, wd)
        self.wv = param(rngs, (d, k, e), ("embed", "kv_heads", "head_dim"), std, wd)
        self.wo = param(rngs, (h, e, d), ("heads", "head_dim", "embed"), std / math.sqrt(2 * cfg.n_layers), wd)
        if cfg.use_bias:
            self.bq = param(rngs, (h, e), ("heads", "head_dim"), None, wd)
            self.bk = param(rngs, (k, e), ("kv_heads", "head_dim"), None, wd)
            self.bv = param(rngs, (k, e), ("kv_heads", "head_dim"), None, wd)
            self.bo = param(rngs, (d,), ("embed",), None, wd)
        else:
            self.bq = self.bk = self.bv = self.bo = None

    def _project(self, x_btd, w, b):
        y = dense(x_btd, w[...].astype(self.dtype))  # btd,dhe->bthe as a 2-D matmul (see layers.dense)
        return y if b is None else y + b[...].astype(self.dtype)

    def _keys(self, x_btd):
        k_bske = self._project(x_btd, self.wk, self.bk)
        return k_bske if self.qk_eps is None else rms_normalize(k_bske, self.qk_eps)

    def memory_kv(self, memory_bsd: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Keys and values of another sequence for cross-attention (no rotary positions)."""
        return self._keys(memory_bsd), self._project(memory_bsd, self.wv, self.bv)

    def __call__(self, x_btd, mask_bts, rope=None, kv_cache=None, cache_index=None, memory_kv=None):
        """Returns the attention output and, when decoding, the updated (k, v) cache buffers.

        With ``memory_kv`` (from :meth:`memory_kv`) this is cross-attention: queries from ``x_btd``,
        keys and values given; no cache is written.
        """
        q_bthe = self._project(x_btd, self.wq, self.bq)
        if self.qk_eps is not None:
            q_bthe = rms_normalize(q_bthe, self.qk_eps)
        if memory_kv is not None:
            k_bske, v_bske = memory_kv
        else:
            k_bske, v_bske = self._keys(x_btd), self._project(x_btd, self.wv, self.bv)
        if self.use_rope and memory_kv is None:
            q_bthe, k_bske = apply_rope(q_bthe, rope), apply_rope(k_bske, rope)
        if kv_cache is not None or memory_kv is not None:  # decoding, cross-attention: the dense mask, XLA
            mask_bts = mask_bts.dense() if isinstance(mask_bts, Mask) else mask_bts
        if kv_cache is not None:  # write this step's keys/values at cache_index, attend over the buffer
            cache_k, cache_v = kv_cache  # cache_index: [] (all rows) or [B] (each row's own position)
            k_bske, v_bske = write_rows(cache_k, k_bske, cache_index, 1), write_rows(cache_v, v_bske, cache_index, 1)
            kv_cache = (k_bske, v_bske)
        k_bske, v_bske = k_bske.astype(self.dtype), v_bske.astype(self.dtype)
        if self.sow_weights:  # the reference path, its weights [b, h, t, s] sown as an nnx.Intermediate
            dense_bts = mask_bts.dense() if isinstance(mask_bts, Mask) else mask_bts
            out_bthe, weights_bhts = reference_attention(q_bthe, k_bske, v_bske, dense_bts, with_weights=True)
            self.sow(nnx.Intermediate, "weights", weights_bhts)
        else:
            out_bthe = dot_product_attention(q_bthe, k_bske, v_bske, mask_bts, self.impl)
        out_btd = jnp.einsum("bthe,hed->btd", out_bthe, self.wo[...].astype(self.dtype))
        if self.bo is not None:
            out_btd = out_btd + self.bo[...].astype(self.dtype)
        return out_btd, kv_cache
