"""The Transformer's shared parts and the decoder-only language model built from them.

A pre-norm block reads ``x = x + attn(norm(x)); x = x + mlp(norm(x))``; the post-norm block of the
original paper is ``x = norm(x + attn(x)); x = norm(x + mlp(x))``. A block built with
``cross=True`` (the encoder-decoder's decoder, model/encoder.py) adds ``x = x + cross_attn(norm(x),
memory)`` between the two, with keys and values from the encoder's output.

Layers are stored stacked (every block parameter has a leading ``layers`` axis), so one parameter
layout serves both ``lax.scan`` over layers (fast compiles for deep models) and an unrolled loop;
checkpoints do not depend on that choice.

Decoding uses an explicit cache of arrays, passed in and returned: ``{"k", "v": [L, B, S, K, E],
"segments": [B, S], "index": [] or [B]}``: one write position for all rows, or one per row (``init_cache(...,
per_row=True)``: rows at different lengths, as continuous batching keeps them). The model holds no device or
sharding logic.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from .attention import Attention, Mask
from .config import ModelConfig
from .constrain import constrain
from .loss import project
from .moe import MoeMlp
from .layers import Mlp, Norm, dropout, param, rope_angles, rope_frequencies, sinusoidal_embedding, write_rows

Cache = dict[str, jax.Array]
RESIDUAL = ("batch", "length", "activation_embed")  # logical axes of the residual stream (layout hints only)

_REMAT_POLICIES = {
    "full": None,  # save nothing inside a block: recompute it all in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,  # keep weight matmuls
}


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, cross: bool = False):
        self.position, self.rate = cfg.norm_position, cfg.dropout
        self.attn_norm = Norm(cfg, rngs)
        self.attn = Attention(cfg, rngs)
        if cross:
            self.cross_norm = Norm(cfg, rngs)
            self.cross_attn = Attention(cfg, rngs)
        self.mlp_norm = Norm(cfg, rngs)
        self.mlp = MoeMlp(cfg, rngs) if cfg.n_experts else Mlp(cfg, rngs)  # routed experts (model/moe.py)
        if cfg.sandwich_norm:  # Gemma 2 / 3: each sub-layer's output normalised too, before the residual add
            self.attn_post_norm, self.mlp_post_norm = Norm(cfg, rngs), Norm(cfg, rngs)
        else:
            self.attn_post_norm = self.mlp_post_norm = None

    def __call__(self, x, mask, rope, kv_cache=None, cache_index=None, key=None, memory=None, sliding=False):
        """memory: ((keys, values) of the encoder output for this layer, cross-attention mask) or None.
        sliding: this layer attends over the sliding window (static; ``rope`` is then the local table)."""
        k_attn, k_cross, k_mlp = jax.random.split(key, 3) if key is not None else (None, None, None)
        h, kv_cache = self.attn(self._in(x, self.attn_norm), mask, rope, kv_cache, cache_index, sliding=sliding)
        x = self._add(x, h, self.attn_norm, self.attn_post_norm, k_attn)
        if memory is not None:
            memory_kv, memory_mask = memory
            h, _ = self.cross_attn(self._in(x, self.cross_norm), memory_mask, memory_kv=memory_kv)
            x = self._add(x, h, self.cross_norm, None, k_cross)
        x = self._add(x, self.mlp(self._in(x, self.mlp_norm)), self.mlp_norm, self.mlp_post_norm, k_mlp)
        return x, kv_cache

    def _in(self, x, norm):  # pre-norm: a sub-layer reads norm(x)
        return norm(x) if self.position == "pre" else x

    def _add(self, x, h, norm, post_norm, key):
        """The residual: pre x + h (x + post_norm(h) with sandwich norms), output x + norm(h), post norm(x + h)."""
        if self.position == "output":
            h = norm(h)
        elif post_norm is not None:
            h = post_norm(h)
        x = x + dropout(h, self.rate, key)
        return norm(x) if self.position == "post" else x


def stacked_blocks(cfg: ModelConfig, n_layers: int, rngs: nnx.Rngs, cross: bool = False) -> Block:
    """``n_layers`` blocks whose parameters are stacked on a leading ``layers`` axis."""
    @nnx.split_rngs(splits=n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers", "axes": "layers"})
    def make(rngs: nnx.Rngs) -> Block:
        return Block(cfg, rngs, cross)

    return make(rngs)


def run_blocks(cfg: ModelConfig, blocks: Block, x, mask, rope, kv=None, index=None, keys=None, memory=None,
               rope_local=None):
    """Apply stacked blocks in order (scanned or unrolled, rematerialised as configured).

    memory: None, or (encoder output [b, s, d] or per-layer (k, v) stacked [L, b, s, K, E], mask).
    rope_local: the rotary tables of sliding layers when they have their own base (``model.rope_local_theta``).
    A model with both sliding and full layers (``model.layer_types``) runs each layer through ``lax.cond``
    between the two static variants, so each keeps a static window (what the flash kernels need).
    Returns the output and the updated per-layer self-attention caches (None when not decoding).
    """
    graphdef, stacked = nnx.split(blocks)
    memory_bsd, memory_kv, memory_mask = None, None, None
    if memory is not None:
        source, memory_mask = memory
        memory_bsd, memory_kv = (None, source) if isinstance(source, tuple) else (source, None)
    sliding_l = cfg.layer_is_sliding() if cfg.kind == "decoder" else (False,) * len(jax.tree.leaves(stacked)[0])
    mixed = len(set(sliding_l)) > 1

    def apply(sliding, x, params, layer_kv, key, layer_memory_kv):
        block = nnx.merge(graphdef, params)
        if memory_bsd is not None:  # training: project this layer's cross-attention keys/values here
            layer_memory_kv = block.cross_attn.memory_kv(memory_bsd)
        layer_memory = None if memory_mask is None else (layer_memory_kv, memory_mask)
        layer_rope = rope_local if sliding and rope_local is not None else rope
        x, layer_kv = block(x, mask, layer_rope, layer_kv, index, key, layer_memory, sliding=sliding)
        sown = nnx.pop(block, nnx.Intermediate)  # attention weights when asked for (qkv explain), else empty
        return x, layer_kv, sown

    def layer(x, xs):
        params, layer_kv, key, layer_memory_kv, sliding = xs
        if mixed:
            x, layer_kv, sown = jax.lax.cond(sliding, functools.partial(apply, True), functools.partial(apply, False),
                                             x, params, layer_kv, key, layer_memory_kv)
        else:
            x, layer_kv, sown = apply(sliding_l[0], x, params, layer_kv, key, layer_memory_kv)
        return constrain(x, RESIDUAL), (layer_kv, sown)

    if cfg.remat != "none":
        layer = jax.checkpoint(layer, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=cfg.scan_layers is False)
    n_layers = len(sliding_l)
    if kv is None:
        xs = (stacked, kv, keys, memory_kv, jnp.asarray(sliding_l))
        if cfg.scan_layers is not False:  # None (the platform's choice, unresolved) scans
            x, (kv, sown) = jax.lax.scan(layer, x, xs)
        else:
            outputs = [None] * n_layers
            for i in range(n_layers):
                x, outputs[i] = layer(x, jax.tree.map(lambda a: a[i], xs))
            kv, sown = jax.tree.map(lambda *a: jnp.stack(a), *outputs)
    else:
        # Decoding: the stacked [L, B, S, K, E] buffers are carried, and only this call's new rows of each layer go
        # back into them, in place (a donated cache is never copied whole); each layer attends over its own slice
        # with the rows written, as before. Layer i's slice is read from the buffers after layer i-1's write.
        t = x.shape[1]

        def decode_layer(carry, xs):
            x, kv, i = carry
            layer_kv = tuple(jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False) for a in kv)
            x, (layer_kv, sown) = layer(x, (xs[0], layer_kv, *xs[1:]))
            kv = tuple(write_layer_rows(a, read_rows(new, index, t), i, index) for a, new in zip(kv, layer_kv))
            return (x, kv, i + 1), sown

        xs = (stacked, keys, memory_kv, jnp.asarray(sliding_l))
        carry = (x, kv, jnp.int32(0))
        if cfg.scan_layers is not False:
            (x, kv, _), sown = jax.lax.scan(decode_layer, carry, xs)
        else:
            outputs = [None] * n_layers
            for i in range(n_layers):
                carry, outputs[i] = decode_layer(carry, jax.tree.map(lambda a: a[i], xs))
            (x, kv, _), sown = carry, jax.tree.map(lambda *a: jnp.stack(a), *outputs)
    if jax.tree.leaves(sown):
        nnx.update(blocks, sown)  # stacked like the parameters: [layers, ...] on the blocks' modules
    return x, kv


def _row_slots(index, length: int, size: int):
    """[B, 1] row ids and [B, T] slots from each row's ``index`` on, clamped into ``size`` as
    ``lax.dynamic_update_slice`` (``write_rows``) clamps them."""
    start_b1 = jnp.clip(jnp.reshape(index, (-1, 1)), 0, size - length)
    return jnp.arange(start_b1.shape[0])[:, None], start_b1 + jnp.arange(length)


def read_rows(buffer_bs, index, length: int):
    """The ``length`` rows of ``buffer_bs`` [B, S, ...] that ``write_rows(..., index, axis=1)`` wrote from ``index`` on
    (one position for every row, index [], or each row's own, index [B])."""
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_slice_in_dim(buffer_bs, index, length, axis=1)
    rows_b1, slots_bt = _row_slots(index, length, buffer_bs.shape[1])
    return buffer_bs[rows_b1, slots_bt]


def write_layer_rows(buffer_lbs, rows_bt, layer, index):
    """``buffer_lbs`` [L, B, S, ...] with ``rows_bt`` [B, T, ...] written into layer ``layer`` from ``index`` on
    (index [] or [B], as ``write_rows``): an in-place update of T positions, not of the layer's whole slice."""
    rows_bt = rows_bt.astype(buffer_lbs.dtype)
    if jnp.ndim(index) == 0:
        start = (layer, 0, index) + (0,) * (buffer_lbs.ndim - 3)
        return jax.lax.dynamic_update_slice(buffer_lbs, rows_bt[None], start)
    rows_b1, slots_bt = _row_slots(index, rows_bt.shape[1], buffer_lbs.shape[2])
    return buffer_lbs.at[layer, rows_b1, slots_bt].set(rows_bt, indices_are_sorted=True, unique_indices=True)


def layer_keys(cfg: ModelConfig, key: jax.Array | None, n_layers: int) -> tuple[jax.Array | None, Any]:
    """(key for the embedding dropout, one key per layer), or (None, None) without dropout."""
    if key is None or cfg.dropout == 0:
        return None, None
    embed_key, layers_key = jax.random.split(key)
    return embed_key, jax.random.split(layers_key, n_layers)


class EmbedAndHead(nnx.Module):
    """What every shape shares: token (+ position) embeddings in, a final norm and vocabulary logits out."""

    def init_io(self, cfg: ModelConfig, rngs: nnx.Rngs) -> None:
        self.cfg = cfg
        self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std, cfg.weight_dtype)
        if cfg.positions == "learned":
            self.pos_embed = param(rngs, (cfg.max_seq_len, cfg.d_model), ("position", "embed"), cfg.init_std,
                                   cfg.weight_dtype)
        if cfg.norm_position != "post":  # post-norm blocks already end normalised
            self.final_norm = Norm(cfg, rngs)
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std,
                                 cfg.weight_dtype)

    def embed_tokens(self, tokens_bt, positions_bt, key=None):
        """(token + position embeddings [B, T, D] in the compute dtype, rotary tables or None)."""
        cfg, dtype = self.cfg, self.cfg.compute_dtype
        x_btd = jnp.take(self.embed[...], tokens_bt, axis=0).astype(dtype)
        if cfg.embed_scale:  # Gemma: embeddings times sqrt(d_model), the factor rounded to the compute dtype
            x_btd = x_btd * jnp.asarray(math.sqrt(cfg.d_model), dtype)
        if cfg.positions == "learned":
            x_btd = x_btd + jnp.take(self.pos_embed[...], positions_bt, axis=0).astype(dtype)
        elif cfg.positions == "sinusoidal":
            x_btd = x_btd + sinusoidal_embedding(positions_bt, cfg.d_model).astype(dtype)
        rope = rope_angles(positions_bt, rope_frequencies(cfg)) if cfg.positions == "rope" else None
        return constrain(dropout(x_btd, cfg.dropout, key), RESIDUAL), rope

    def local_rope(self, positions_bt):
        """Rotary tables of sliding layers with their own base (``model.rope_local_theta``), else None."""
        cfg = self.cfg
        if cfg.positions != "rope" or not cfg.rope_local_theta:
            return None
        local = cfg.replace(rope_theta=cfg.rope_local_theta, rope_scaling="none", rope_factor=1.0)
        return rope_angles(positions_bt, rope_frequencies(local))

    def final(self, x_btd):
        return self.final_norm(x_btd) if self.cfg.norm_position != "post" else x_btd

    def output_weights(self) -> tuple[jax.Array, bool]:
        """(the output projection's weights, tied): the embedding [V, D] when tied, else lm_head [D, V]."""
        return (self.embed[...], True) if self.cfg.tie_embeddings else (self.lm_head[...], False)

    def vocab_logits(self, x_btd):
        """Float32 logits [B, T, vocab] of final-normalised hidden states (float32 accumulation)."""
        return project(x_btd, *self.output_weights(), self.cfg.logit_softcap)


def default_slots(tokens_bt, positions_bt, segment_ids_bt, index=None):
    """(key-buffer slots of the queries, positions, segment ids) with the defaults filled in."""
    b, t = tokens_bt.shape
    index_b1 = jnp.reshape(0 if index is None else index, (-1, 1))  # one write position, or one per row
    q_slots_bt = jnp.broadcast_to(index_b1 + jnp.arange(t, dtype=jnp.int32), (b, t))
    positions_bt = q_slots_bt if positions_bt is None else positions_bt
    segment_ids_bt = jnp.ones((b, t), jnp.int32) if segment_ids_bt is None else segment_ids_bt
    return q_slots_bt, positions_bt, segment_ids_bt


class Transformer(EmbedAndHead):
    """Decoder-only (GPT/Llama): causal self-attention blocks, next-token logits."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.init_io(cfg, rngs)
        self.blocks = stacked_blocks(cfg, cfg.n_layers, rngs)

    def __call__(self, tokens_bt: jax.Array, positions_bt: jax.Array | None = None,
                 segment_ids_bt: jax.Array | None = None, cache: Cache | None = None,
                 dropout_key: jax.Array | None = None, memory: tuple[Any, jax.Array] | None = None,
                 hidden: bool = False) -> tuple[jax.Array, Cache | None]:
        """Float32 logits [B, T, vocab] and the updated cache (None when not decoding).

        positions: index of each token within its document (default 0..T-1, offset by the cache).
        segment_ids: document id of each token for packed rows; 0 marks padding (default all 1).
        memory: (encoder output [B, S, D] or its per-layer keys/values, source segment ids [B, S]) for
        the encoder-decoder's cross-attention; a target token sees the source tokens of its segment.
        hidden: return the final hidden states [B, T, D] instead of the logits.
        """
        index = jnp.int32(0) if cache is None else cache["index"]
        q_slots_bt, positions_bt, segment_ids_bt = default_slots(tokens_bt, positions_bt, segment_ids_bt, index)
        embed_key, keys = layer_keys(self.cfg, dropout_key, self.cfg.n_layers)
        x_btd, rope = self.embed_tokens(tokens_bt, positions_bt, embed_key)
        if cache is None:
            k_segments_bs, kv = segment_ids_bt, None
        else:
            k_segments_bs = write_rows(cache["segments"], segment_ids_bt, index, axis=1)
            kv = (cache["k"], cache["v"])
        mask_bts = Mask(q_slots_bt, segment_ids_bt, k_segments_bs)  # attention_mask's parts (flash kernels)
        if memory is not None:
            memory = (memory[0], Mask(None, segment_ids_bt, memory[1]))
        x_btd, kv = run_blocks(self.cfg, self.blocks, x_btd, mask_bts, rope, kv, index, keys, memory,
                               rope_local=self.local_rope(positions_bt))
        x_btd = self.final(x_btd)
        t = tokens_bt.shape[1]
        new_cache = None if cache is None else {"k": kv[0], "v": kv[1], "segments": k_segments_bs, "index": index + t}
        return (x_btd if hidden else self.vocab_logits(x_btd)), new_cache

    def forward_batch(self, batch: dict[str, jax.Array], dropout_key: jax.Array | None = None) -> jax.Array:
        """Logits aligned with ``batch["targets"]`` (the train step's one entry point into every shape)."""
        return self(batch["inputs"], batch["positions"], batch["segment_ids"], dropout_key=dropout_key)[0]

    def forward_hidden(self, batch: dict[str, jax.Array], dropout_key: jax.Array | None = None) -> jax.Array:
        """Final hidden states whose ``vocab_logits`` are ``forward_batch`` (the chunked loss's input)."""
        return self(batch["inputs"], batch["positions"], batch["segment_ids"], dropout_key=dropout_key,
                    hidden=True)[0]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: jnp.dtype | None = None,
               per_row: bool = False) -> Cache:
    """An empty decoding cache for ``batch`` rows of up to ``max_len`` tokens; ``per_row``: each row keeps its own
    write position (index [batch])."""
    shape = (cfg.n_layers, batch, max_len, cfg.num_kv_heads, cfg.head_size)
    dtype = dtype or cfg.compute_dtype
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "segments": jnp.zeros((batch, max_len), jnp.int32),
        "index": jnp.zeros((batch,), jnp.int32) if per_row else jnp.int32(0),
    }


def reorder_cache(cache: Cache, parent_n: jax.Array) -> Cache:
    """Beam search: each row's cache taken from its parent beam's row (k/v carry layers first)."""
    return {"k": cache["k"][:, parent_n], "v": cache["v"][:, parent_n], "segments": cache["segments"][parent_n],
            "index": cache["index"]}
