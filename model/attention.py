"""Multi-head (and grouped-query) attention: causal or bidirectional self-attention, and cross-attention.

softmax(mask(cap(scale · Q Kᵀ))) · V per head, heads concatenated and projected back. One module serves
all three uses: self-attention projects queries, keys and values from the same sequence (causal in a
decoder, bidirectional in an encoder, the mask decides); cross-attention takes its keys and values
from another sequence (the encoder's output), projected once with ``memory_kv`` and reused at every
decoding step. The explicit einsum ``reference_attention`` is the readable definition and what tests
compare against::

    scores_bkgts = einsum("btkge,bske->bkgts", q, k) * scale          # scale: 1/√e unless given
    scores_bkgts = c * tanh(scores_bkgts / c)                          # soft-cap c > 0 (Gemma 2)
    probs_bkgts = softmax(where(mask_bts, scores_bkgts, -inf), axis=s)
    out_btkge = einsum("bkgts,bske->btkge", probs_bkgts, v)

One mask rule (``attention_mask``): query at slot i sees key slot j iff both lie in the same segment,
j <= i when causal, and i - W < j with a sliding window W > 0 (transformers' sliding_window rule; the
rule mirrored, |i - j| < W, when not causal). ``model.attention_impl`` chooses what runs:

- ``xla``: ``jax.nn.dot_product_attention(implementation="xla")``, which materialises the
  ``[b, h, t, s]`` scores (quadratic memory in T); with a soft-cap, which jax's function lacks, the
  einsum definition above (the same math, compiled by XLA).
- ``splash``: the Pallas TPU splash flash-attention kernel (model/flash.py), O(T) memory; it takes
  windows and soft-caps.
- ``cudnn``: on GPUs, cuDNN's fused attention for rows of one document (it takes a causal window, no
  soft-cap), else the Pallas GPU flash kernel with segment ids (neither) or, where that cannot run,
  XLA for those rows (model/flash.py ``gpu_plan``).
- ``auto`` (default): splash when compiling for TPU, cudnn on GPU, xla on CPU.

``choose_impl`` decides, and says why it fell back (``qkv plan`` prints it): a shape or feature the
kernel cannot take runs on ``xla``; mesh rules that split ``length`` or ``head_dim`` are refused for a
named kernel (it runs per shard) and run ``xla`` under ``auto``. The flash kernels serve training-time
self-attention (causal or bidirectional, packed segments, padding, grouped-query heads); decoding over
a cache and cross-attention always run on ``xla`` with the dense mask, which holds the window.

Shape suffixes: b batch, t query length, s key length, d model width, h query heads, k kv heads,
g query heads per kv head, e head size.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from typing import NamedTuple

from qkv.errors import UserError

from . import flash
from .config import ModelConfig
from .layers import apply_rope, dense, param, rms_normalize, write_rows


def attention_mask(q_slots_bt: jax.Array | None, q_segments_bt: jax.Array, k_segments_bs: jax.Array,
                   window: int = 0) -> jax.Array:
    """Boolean [b, t, s]: query at slot i sees key slot j iff j <= i, both lie in the same segment and,
    with a sliding ``window`` W > 0, i - W < j (the query and the W - 1 keys before it).

    Segments keep packed documents apart (and padding, segment 0, to itself); slots are positions in
    the key buffer, so the same rule serves training (slots 0..T-1) and cached decoding (query slots
    offset by the cache index). With ``q_slots_bt=None`` the mask is not causal: segments alone decide
    (encoders, cross-attention, where a target example's segment id names its source example); a
    window there is the rule mirrored, |i - j| < W with query i at slot i (transformers' bidirectional
    sliding window counts |i - j| <= W: its W is this W - 1).
    """
    same_segment_bts = k_segments_bs[:, None, :] == q_segments_bt[:, :, None]
    k_slots_s = jnp.arange(k_segments_bs.shape[1])
    if q_slots_bt is None:
        if not window:
            return same_segment_bts
        q_slots_bt = jnp.broadcast_to(jnp.arange(q_segments_bt.shape[1]), q_segments_bt.shape)
        distance_bts = jnp.abs(q_slots_bt[:, :, None] - k_slots_s[None, None, :])
        return same_segment_bts & (distance_bts < window)
    causal_bts = k_slots_s[None, None, :] <= q_slots_bt[:, :, None]
    if window:
        causal_bts &= k_slots_s[None, None, :] > q_slots_bt[:, :, None] - window
    return causal_bts & same_segment_bts


class Mask(NamedTuple):
    """The parts of ``attention_mask`` (one rule), kept apart so flash kernels can read them.

    ``dense(window)`` is the boolean [b, t, s] of the rule; kernels use q_slots (None: not causal) and
    the segment ids directly. Where a dense array is passed instead, attention runs on XLA.
    """

    q_slots_bt: jax.Array | None
    q_segments_bt: jax.Array
    k_segments_bs: jax.Array

    def dense(self, window: int = 0) -> jax.Array:
        return attention_mask(self.q_slots_bt, self.q_segments_bt, self.k_segments_bs, window)


class Choice(NamedTuple):
    """What runs for one attention call: ``impl`` (what ``dot_product_attention`` dispatches on: xla,
    reference, splash, cudnn), ``kernels`` (in words, as ``qkv plan`` reports it: xla, reference, splash,
    cudnn+pallas-gpu, cudnn+xla, pallas-gpu) and ``reason`` ('' when what was asked runs)."""

    impl: str
    kernels: str
    reason: str


def choose_impl(impl: str, t: int, s: int, e: int, *, causal: bool = True, window: int = 0, softcap: float = 0.0,
                dtype=jnp.float32, platform: str | None = None) -> Choice:
    """What ``model.attention_impl`` runs for self-attention of t queries over s keys of head size e with
    these features, compiled for ``platform`` (None: the active layout's devices, else the default backend).

    ``auto`` picks the platform's kernel (splash on TPU, cudnn on GPU, xla elsewhere); a kernel that cannot
    take the shape or the features falls back to xla with the reason. Under mesh rules that split
    ``length`` or ``head_dim`` no kernel is right (each shard would attend on its own): ``auto`` runs xla,
    an explicitly named kernel is refused.
    """
    platform = platform or flash.target_platform()
    asked = impl
    if impl == "auto":
        impl = {"tpu": "splash", "gpu": "cudnn"}.get(platform, "xla")
        if impl == "xla":
            return Choice("xla", "xla", f"auto: no flash kernel for {platform}")
    if impl in ("xla", "reference"):
        return Choice(impl, impl, "")
    split = flash.sharded_dims(t, e)
    if split:
        dims = " and ".join(split)
        if asked != "auto":
            raise UserError(f"model.attention_impl={impl}: mesh.rules split {dims}, and the {impl} kernel runs per "
                            f"shard, so it would attend from its shard of {dims} alone; set model.attention_impl=xla "
                            f"(or auto), or mesh.rules that leave length and head_dim unsplit")
        return Choice("xla", "xla", f"mesh.rules split {dims}: no kernel runs per shard of it")
    if impl == "splash":
        why = flash.splash_unsupported(t, s, e)
        return Choice("xla", "xla", f"splash: {why}") if why else Choice("splash", "splash", "")
    kernels, why = flash.gpu_plan(t, s, e, dtype, causal, window, softcap)
    return Choice("xla" if kernels == "xla" else "cudnn", kernels, why)


def select_impl(impl: str, t: int, s: int, e: int, **features) -> str:
    """``choose_impl(...).impl``: what ``dot_product_attention`` runs."""
    return choose_impl(impl, t, s, e, **features).impl


def _scores_scale(e: int, scale: float | None) -> float:
    return 1 / math.sqrt(e) if scale is None else scale


def reference_attention(q_bthe: jax.Array, k_bske: jax.Array, v_bske: jax.Array, mask_bts: jax.Array,
                        with_weights: bool = False, *, scale: float | None = None,
                        softcap: float = 0.0) -> jax.Array | tuple[jax.Array, jax.Array]:
    """The textbook definition, written out with einsums (float32 softmax); ``with_weights`` also returns
    the softmax weights [b, h, t, s] (what ``qkv explain`` draws). ``scale`` multiplies q·k (None:
    1/√e); ``softcap`` c > 0 caps the scaled scores at c·tanh(scores / c) before the mask. The dense
    mask already holds any sliding window (``Mask.dense(window)``)."""
    b, t, h, e = q_bthe.shape
    k_heads = k_bske.shape[2]
    q_btkge = q_bthe.reshape(b, t, k_heads, h // k_heads, e)
    scores = jnp.einsum("btkge,bske->bkgts", q_btkge, k_bske).astype(jnp.float32) * _scores_scale(e, scale)
    if softcap:
        scores = softcap * jnp.tanh(scores / softcap)
    scores = jnp.where(mask_bts[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out_btkge = jnp.einsum("bkgts,bske->btkge", probs.astype(v_bske.dtype), v_bske)
    out_bthe = out_btkge.reshape(b, t, h, e)
    return (out_bthe, probs.reshape(b, h, t, -1)) if with_weights else out_bthe


def dot_product_attention(q_bthe, k_bske, v_bske, mask: Mask | jax.Array, impl: str, *, scale: float | None = None,
                          window: int = 0, softcap: float = 0.0) -> jax.Array:
    """Attention by ``impl``; a flash kernel only for self-attention given as a ``Mask`` whose query
    slots are 0..T-1 (training and prefill from an empty cache), XLA otherwise.

    ``scale``, ``window`` and ``softcap`` as in ``attention_mask`` / ``reference_attention``. A dense
    mask must already hold the window (``Mask.dense(window)``); ``window`` is applied to a ``Mask`` only.
    On XLA, jax's attention has no soft-cap: with one, the einsum definition runs (the same math).
    """
    if isinstance(mask, Mask):
        causal = mask.q_slots_bt is not None
        impl = select_impl(impl, q_bthe.shape[1], k_bske.shape[1], q_bthe.shape[3], causal=causal, window=window,
                           softcap=softcap, dtype=q_bthe.dtype)
        if impl in flash.KERNELS:
            return flash.KERNELS[impl](q_bthe, k_bske, v_bske, mask.q_segments_bt, mask.k_segments_bs, causal=causal,
                                       scale=scale, window=window, softcap=softcap)
        mask = mask.dense(window)
    if impl == "reference" or softcap:
        return reference_attention(q_bthe, k_bske, v_bske, mask, scale=scale, softcap=softcap)
    return jax.nn.dot_product_attention(q_bthe, k_bske, v_bske, mask=mask[:, None], scale=scale,
                                        implementation="xla")


class QkNorm(nnx.Module):
    """RMS-normalised queries or keys before RoPE (``model.qk_norm``), in float32.

    rms: over each head's features, no scale (modded-nanogpt); head: the same with a learned scale over
    head_dim shared by the heads (Qwen 3, Gemma 3); projection: over all heads' features together with a
    learned scale per feature (OLMo 2 normalises the whole q / k projection). ``model.norm_scale_offset``
    makes the scale (1 + w) as in Gemma's norms.
    """

    def __init__(self, cfg: ModelConfig, n_heads: int, heads_axis: str):
        self.kind, self.eps, self.offset = cfg.qk_norm, cfg.norm_eps, cfg.norm_scale_offset
        e, wd = cfg.head_size, cfg.weight_dtype
        shape, axes = {"head": ((e,), ("head_dim",)), "projection": ((n_heads, e), (heads_axis, "head_dim"))}.get(
            self.kind, ((), ()))
        self.scale = (nnx.Param((jnp.zeros if self.offset else jnp.ones)(shape, wd), axes=axes, weight_decay=False)
                      if shape else None)

    def __call__(self, x_bthe: jax.Array) -> jax.Array:
        if self.kind == "projection":  # normalise over heads and features together
            b, t, h, e = x_bthe.shape
            y = rms_normalize(x_bthe.reshape(b, t, h * e).astype(jnp.float32), self.eps).reshape(b, t, h, e)
        else:
            y = rms_normalize(x_bthe.astype(jnp.float32), self.eps)
        if self.scale is not None:
            scale = self.scale[...].astype(jnp.float32)
            y = y * (1.0 + scale if self.offset else scale)
        return y.astype(x_bthe.dtype)


class Attention(nnx.Module):
    """Projections, QK-norm, rotary positions, the cache write and ``dot_product_attention`` for one layer.

    ``sliding`` (static, per layer) selects the sliding window (``model.sliding_window``) for this layer's
    self-attention; ``model.query_scale`` and ``model.attn_softcap`` change the scores' scale and cap.
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, h, k, e = cfg.d_model, cfg.n_heads, cfg.num_kv_heads, cfg.head_size
        std, wd = cfg.init_std, cfg.weight_dtype
        self.dtype, self.impl, self.use_rope = cfg.compute_dtype, cfg.attention_impl, cfg.positions == "rope"
        self.scale, self.softcap, self.window = cfg.query_scale or None, cfg.attn_softcap, cfg.sliding_window
        if cfg.qk_norm != "none":
            self.q_norm, self.k_norm = QkNorm(cfg, h, "heads"), QkNorm(cfg, k, "kv_heads")
        else:
            self.q_norm = self.k_norm = None
        self.sow_weights = False  # qkv explain sets it (model.set_attributes): keep the softmax weights
        self.wq = param(rngs, (d, h, e), ("embed", "heads", "head_dim"), std, wd)
        self.wk = param(rngs, (d, k, e), ("embed", "kv_heads", "head_dim"), std, wd)
        self.wv = param(rngs, (d, k, e), ("embed", "kv_heads", "head_dim"), std, wd)
        self.wo = param(rngs, (h, e, d), ("heads", "head_dim", "embed"), std / math.sqrt(2 * cfg.n_layers), wd)
        if cfg.use_bias or cfg.qkv_bias:  # qkv_bias: q/k/v only (Qwen 2)
            self.bq = param(rngs, (h, e), ("heads", "head_dim"), None, wd)
            self.bk = param(rngs, (k, e), ("kv_heads", "head_dim"), None, wd)
            self.bv = param(rngs, (k, e), ("kv_heads", "head_dim"), None, wd)
        else:
            self.bq = self.bk = self.bv = None
        self.bo = param(rngs, (d,), ("embed",), None, wd) if cfg.use_bias else None

    def _project(self, x_btd, w, b):
        y = dense(x_btd, w[...].astype(self.dtype))  # btd,dhe->bthe as a 2-D matmul (see layers.dense)
        return y if b is None else y + b[...].astype(self.dtype)

    def _keys(self, x_btd):
        k_bske = self._project(x_btd, self.wk, self.bk)
        return k_bske if self.k_norm is None else self.k_norm(k_bske)

    def memory_kv(self, memory_bsd: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Keys and values of another sequence for cross-attention (no rotary positions)."""
        return self._keys(memory_bsd), self._project(memory_bsd, self.wv, self.bv)

    def __call__(self, x_btd, mask_bts, rope=None, kv_cache=None, cache_index=None, memory_kv=None, sliding=False):
        """Returns the attention output and, when decoding, the updated (k, v) cache buffers.

        With ``memory_kv`` (from :meth:`memory_kv`) this is cross-attention: queries from ``x_btd``,
        keys and values given; no cache is written.
        """
        window = self.window if sliding and memory_kv is None else 0
        q_bthe = self._project(x_btd, self.wq, self.bq)
        if self.q_norm is not None:
            q_bthe = self.q_norm(q_bthe)
        if memory_kv is not None:
            k_bske, v_bske = memory_kv
        else:
            k_bske, v_bske = self._keys(x_btd), self._project(x_btd, self.wv, self.bv)
        if self.use_rope and memory_kv is None:
            q_bthe, k_bske = apply_rope(q_bthe, rope), apply_rope(k_bske, rope)
        if kv_cache is not None or memory_kv is not None:  # decoding, cross-attention: the dense mask, XLA
            mask_bts = mask_bts.dense(window) if isinstance(mask_bts, Mask) else mask_bts
        if kv_cache is not None:  # write this step's keys/values at cache_index, attend over the buffer
            cache_k, cache_v = kv_cache  # cache_index: [] (all rows) or [B] (each row's own position)
            k_bske, v_bske = write_rows(cache_k, k_bske, cache_index, 1), write_rows(cache_v, v_bske, cache_index, 1)
            kv_cache = (k_bske, v_bske)
        k_bske, v_bske = k_bske.astype(self.dtype), v_bske.astype(self.dtype)
        if self.sow_weights:  # the reference path, its weights [b, h, t, s] sown as an nnx.Intermediate
            dense_bts = mask_bts.dense(window) if isinstance(mask_bts, Mask) else mask_bts
            out_bthe, weights_bhts = reference_attention(q_bthe, k_bske, v_bske, dense_bts, with_weights=True,
                                                         scale=self.scale, softcap=self.softcap)
            self.sow(nnx.Intermediate, "weights", weights_bhts)
        else:
            out_bthe = dot_product_attention(q_bthe, k_bske, v_bske, mask_bts, self.impl, scale=self.scale,
                                             window=window, softcap=self.softcap)
        out_btd = jnp.einsum("bthe,hed->btd", out_bthe, self.wo[...].astype(self.dtype))
        if self.bo is not None:
            out_btd = out_btd + self.bo[...].astype(self.dtype)
        return out_btd, kv_cache
