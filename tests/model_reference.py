"""Tiny model configs and an independent float64 NumPy forward pass, shared by the model and decoding tests.

Nothing here calls the code under test except to build parameters (``build``) and run the jitted
forward (``jit_forward``); the references (attention, norms, RoPE, the whole decoder) are NumPy.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qkv.model import ModelConfig, create_model, split_params

# ----------------------------------------------------------------------------- configs

T = 8  # sequence length used by most tests (every forward of one config shares one compile)
PACKED_SEGMENTS = np.array([1, 1, 1, 2, 2, 2, 0, 0], np.int32)
PACKED_POSITIONS = np.array([0, 1, 2, 0, 1, 2, 0, 1], np.int32)

# rope + RMSNorm (pre) + SwiGLU + tied embeddings + grouped-query attention (4 query heads, 2 kv heads)
ROPE = ModelConfig(vocab_size=53, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=32, max_seq_len=16)
# learned positions + LayerNorm + GELU(tanh) + biases + untied head + post-norm (no final norm), MHA
LEARNED = ROPE.replace(positions="learned", norm="layernorm", norm_position="post", activation="gelu",
                       use_bias=True, tie_embeddings=False, n_kv_heads=None)
# sinusoidal + ReLU + explicit head_dim (heads*head_dim = 8 != d_model) + multi-query attention (1 kv head)
# + QK-norm
SINUSOIDAL = ROPE.replace(positions="sinusoidal", activation="relu", tie_embeddings=False, use_bias=True,
                          n_heads=2, n_kv_heads=1, head_dim=4, qk_norm=True)
CONFIGS = {"rope": ROPE, "learned": LEARNED, "sinusoidal": SINUSOIDAL}


def randomize(params, seed: int):
    """Replace every parameter with O(1) random values so no term (biases, norm scales) is trivially 0 or 1."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    rng = np.random.default_rng(seed)
    out = []
    for path, leaf in leaves:
        name = path[-1].key
        noise = rng.standard_normal(leaf.shape)
        if name == "scale":
            value = 1.0 + 0.2 * noise
        elif name in ("bias", "bq", "bk", "bv", "bo", "bi"):
            value = 0.2 * noise
        else:
            value = 0.3 * noise
        out.append(jnp.asarray(value, leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


@functools.lru_cache(maxsize=None)
def build(cfg: ModelConfig, seed: int = 0):
    """(graphdef, randomised params, jitted forward) for one config, shared between tests."""
    graphdef, params = split_params(create_model(cfg, seed))
    params = randomize(params, seed)
    return graphdef, params, jit_forward(graphdef)


def jit_forward(graphdef):
    @jax.jit
    def forward(params, tokens, positions=None, segments=None, cache=None):
        return nnx.merge(graphdef, params)(tokens, positions, segments, cache=cache)

    return forward


def tokens_for(cfg: ModelConfig, batch: int = 2, length: int = T, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, length)).astype(np.int32)


# ----------------------------------------------------------------------------- NumPy float64 reference


def np_softmax_attention(q, k, v, mask):
    """softmax(q kᵀ/√e) v in float64; kv head j serves query heads j*g .. j*g+g-1 (g = h / kv heads)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    scores = np.einsum("bthe,bshe->bhts", q, k) / math.sqrt(q.shape[-1])
    scores = np.where(np.asarray(mask)[:, None], scores, -np.inf)
    scores = scores - scores.max(-1, keepdims=True)
    probs = np.exp(scores)
    probs = probs / probs.sum(-1, keepdims=True)
    return np.einsum("bhts,bshe->bthe", probs, v)


def np_mask(segments_bt):
    """[b, t, s]: causal and same segment, built with explicit loops."""
    b, t = segments_bt.shape
    mask = np.zeros((b, t, t), bool)
    for r in range(b):
        for i in range(t):
            for j in range(i + 1):
                mask[r, i, j] = segments_bt[r, i] == segments_bt[r, j]
    return mask


def np_rms(x, eps):
    """x / RMS(x) over the last axis (RMSNorm without its scale; QK-norm)."""
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps)


def np_norm(cfg, x, p):
    if cfg.norm == "layernorm":
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + cfg.norm_eps) * p["scale"] + p["bias"]
    return np_rms(x, cfg.norm_eps) * p["scale"]


def np_rope(x_bthe, positions_bt, theta):
    e = x_bthe.shape[-1]
    half = e // 2
    freqs = 1.0 / theta ** (np.arange(half) * 2.0 / e)
    ang = positions_bt[:, :, None, None] * freqs  # [b, t, 1, half]
    cos, sin = np.cos(ang), np.sin(ang)
    x1, x2 = x_bthe[..., :half], x_bthe[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def np_attention_block(cfg, x, p, positions, mask):
    def proj(w, b):
        y = np.einsum("btd,dhe->bthe", x, p[w])
        return y + p[b] if cfg.use_bias else y

    q, k, v = proj("wq", "bq"), proj("wk", "bk"), proj("wv", "bv")
    if cfg.qk_norm != "none":
        q, k = np_rms(q, cfg.norm_eps), np_rms(k, cfg.norm_eps)
    if cfg.positions == "rope":
        q, k = np_rope(q, positions, cfg.rope_theta), np_rope(k, positions, cfg.rope_theta)
    out = np.einsum("bthe,hed->btd", np_softmax_attention(q, k, v, mask), p["wo"])
    return out + p["bo"] if cfg.use_bias else out


def np_mlp(cfg, x, p):
    h = x @ p["wi"] + (p["bi"] if cfg.use_bias else 0.0)
    if cfg.activation == "swiglu":
        gate = x @ p["wg"]
        h = gate / (1.0 + np.exp(-gate)) * h
    elif cfg.activation == "gelu":
        h = 0.5 * h * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h**3)))
    else:
        h = np.maximum(h, 0.0)
    return h @ p["wo"] + (p["bo"] if cfg.use_bias else 0.0)


def np_sinusoidal(positions_bt, d):
    half = d // 2
    out = np.zeros(positions_bt.shape + (d,))
    for i in range(half):
        freq = 10_000.0 ** (-i / half)
        out[..., i] = np.sin(positions_bt * freq)
        out[..., half + i] = np.cos(positions_bt * freq)
    return out


def np_forward(cfg, params, tokens, positions=None, segments=None):
    """The whole decoder in float64 NumPy, reading weights from the pure params dict."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    b, t = tokens.shape
    positions = np.broadcast_to(np.arange(t), (b, t)) if positions is None else np.asarray(positions)
    segments = np.ones((b, t), np.int32) if segments is None else np.asarray(segments)
    mask = np_mask(segments)
    x = p["embed"][tokens]
    if cfg.positions == "learned":
        x = x + p["pos_embed"][positions]
    elif cfg.positions == "sinusoidal":
        x = x + np_sinusoidal(positions.astype(np.float64), cfg.d_model)
    for layer in range(cfg.n_layers):
        lp = jax.tree.map(lambda a: a[layer], p["blocks"])
        if cfg.norm_position == "pre":
            x = x + np_attention_block(cfg, np_norm(cfg, x, lp["attn_norm"]), lp["attn"], positions, mask)
            x = x + np_mlp(cfg, np_norm(cfg, x, lp["mlp_norm"]), lp["mlp"])
        else:
            x = np_norm(cfg, x + np_attention_block(cfg, x, lp["attn"], positions, mask), lp["attn_norm"])
            x = np_norm(cfg, x + np_mlp(cfg, x, lp["mlp"]), lp["mlp_norm"])
    if cfg.norm_position == "pre":
        x = np_norm(cfg, x, p["final_norm"])
    return x @ p["embed"].T if cfg.tie_embeddings else x @ p["lm_head"]
