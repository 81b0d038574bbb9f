"""The decoder-only Transformer: embeddings → N blocks → norm → vocabulary logits.

A pre-norm block reads ``x = x + attn(norm(x)); x = x + mlp(norm(x))``; the post-norm block of the
original paper is ``x = norm(x + attn(x)); x = norm(x + mlp(x))``.

Layers are stored stacked (every block parameter has a leading ``layers`` axis), so one parameter
layout serves both ``lax.scan`` over layers (fast compiles for deep models) and an unrolled loop;
checkpoints do not depend on that choice.

Decoding uses an explicit cache of arrays, passed in and returned: ``{"k", "v": [L, B, S, K, E],
"segments": [B, S], "index": []}``. The model holds no device or sharding logic.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .attention import Attention, attention_mask
from .config import ModelConfig
from .constrain import constrain
from .layers import Mlp, Norm, dropout, param, rope_angles, sinusoidal_embedding

Cache = dict[str, jax.Array]
RESIDUAL = ("batch", "length", "activation_embed")  # logical axes of the residual stream (layout hints only)

_REMAT_POLICIES = {
    "full": None,  # save nothing inside a block: recompute it all in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,  # keep weight matmuls
}


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.pre_norm, self.rate = cfg.norm_position == "pre", cfg.dropout
        self.attn_norm = Norm(cfg, rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = Norm(cfg, rngs)
        self.mlp = Mlp(cfg, rngs)

    def __call__(self, x, mask, rope, kv_cache=None, cache_index=None, key=None):
        k_attn, k_mlp = jax.random.split(key) if key is not None else (None, None)
        if self.pre_norm:
            h, kv_cache = self.attn(self.attn_norm(x), mask, rope, kv_cache, cache_index)
            x = x + dropout(h, self.rate, k_attn)
            x = x + dropout(self.mlp(self.mlp_norm(x)), self.rate, k_mlp)
        else:
            h, kv_cache = self.attn(x, mask, rope, kv_cache, cache_index)
            x = self.attn_norm(x + dropout(h, self.rate, k_attn))
            x = self.mlp_norm(x + dropout(self.mlp(x), self.rate, k_mlp))
        return x, kv_cache


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std, cfg.weight_dtype)
        if cfg.positions == "learned":
            self.pos_embed = param(rngs, (cfg.max_seq_len, cfg.d_model), ("position", "embed"), cfg.init_std,
                                   cfg.weight_dtype)

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers", "axes": "layers"})
        def stacked_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, rngs)

        self.blocks = stacked_blocks(rngs)
        if cfg.norm_position == "pre":  # post-norm blocks already end normalised
            self.final_norm = Norm(cfg, rngs)
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std,
                                 cfg.weight_dtype)

    def __call__(self, tokens_bt: jax.Array, positions_bt: jax.Array | None = None,
                 segment_ids_bt: jax.Array | None = None, cache: Cache | None = None,
                 dropout_key: jax.Array | None = None) -> tuple[jax.Array, Cache | None]:
        """Float32 logits [B, T, vocab] and the updated cache (None when not decoding).

        positions: index of each token within its document (default 0..T-1, offset by the cache).
        segment_ids: document id of each token for packed rows; 0 marks padding (default all 1).
        """
        cfg, dtype = self.cfg, self.cfg.compute_dtype
        b, t = tokens_bt.shape
        index = jnp.int32(0) if cache is None else cache["index"]
        q_slots_bt = jnp.broadcast_to(index + jnp.arange(t, dtype=jnp.int32), (b, t))
        positions_bt = q_slots_bt if positions_bt is None else positions_bt
        segment_ids_bt = jnp.ones((b, t), jnp.int32) if segment_ids_bt is None else segment_ids_bt

        x_btd = jnp.take(self.embed[...], tokens_bt, axis=0).astype(dtype)
        if cfg.positions == "learned":
            x_btd = x_btd + jnp.take(self.pos_embed[...], positions_bt, axis=0).astype(dtype)
        elif cfg.positions == "sinusoidal":
            x_btd = x_btd + sinusoidal_embedding(positions_bt, cfg.d_model).astype(dtype)
        rope = rope_angles(positions_bt, cfg.head_size, cfg.rope_theta) if cfg.positions == "rope" else None

        keys = None
        if dropout_key is not None and cfg.dropout > 0:
            dropout_key, layers_key = jax.random.split(dropout_key)
            keys = jax.random.split(layers_key, cfg.n_layers)
            x_btd = dropout(x_btd, cfg.dropout, dropout_key)

        if cache is None:
            k_segments_bs, kv = segment_ids_bt, None
        else:
            k_segments_bs = jax.lax.dynamic_update_slice(cache["segments"], segment_ids_bt, (0, index))
            kv = (cache["k"], cache["v"])
        mask_bts = attention_mask(q_slots_bt, segment_ids_bt, k_segments_bs)
        x_btd = constrain(x_btd, RESIDUAL)
        x_btd, kv = self._run_blocks(x_btd, mask_bts, rope, kv, index, keys)

        if cfg.norm_position == "pre":
            x_btd = self.final_norm(x_btd)
        if cfg.tie_embeddings:
            logits = jnp.einsum("btd,vd->btv", x_btd, self.embed[...].astype(dtype))
        else:
            logits = jnp.einsum("btd,dv->btv", x_btd, self.lm_head[...].astype(dtype))
        logits = constrain(logits, ("batch", "length", "vocab"))
        new_cache = None if cache is None else {"k": kv[0], "v": kv[1], "segments": k_segments_bs, "index": index + t}
        return logits.astype(jnp.float32), new_cache

    def _run_blocks(self, x, mask, rope, kv, index, keys):
        graphdef, stacked = nnx.split(self.blocks)

        def layer(x, xs):
            params, layer_kv, key = xs
            x, layer_kv = nnx.merge(graphdef, params)(x, mask, rope, layer_kv, index, key)
            return constrain(x, RESIDUAL), layer_kv

        if self.cfg.remat != "none":
            layer = jax.checkpoint(layer, policy=_REMAT_POLICIES[self.cfg.remat], prevent_cse=not self.cfg.scan_layers)
        if self.cfg.scan_layers:
            return jax.lax.scan(layer, x, (stacked, kv, keys))
        outputs = []
        for i in range(self.cfg.n_layers):
            x, layer_kv = layer(x, jax.tree.map(lambda a: a[i], (stacked, kv, keys)))
            outputs.append(layer_kv)
        return x, (None if kv is None else jax.tree.map(lambda *a: jnp.stack(a), *outputs))


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: jnp.dtype | None = None) -> Cache:
    """An empty decoding cache for ``batch`` rows of up to ``max_len`` tokens."""
    shape = (cfg.n_layers, batch, max_len, cfg.num_kv_heads, cfg.head_size)
    dtype = dtype or cfg.compute_dtype
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "segments": jnp.zeros((batch, max_len), jnp.int32),
        "index": jnp.int32(0),
    }
