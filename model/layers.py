"""Small building blocks: parameters with logical axes, norms, the feed-forward layer, positions.

Every parameter is an ``nnx.Param`` carrying ``axes``: one logical name per dimension (``vocab``,
``embed``, ``heads``, ``kv_heads``, ``head_dim``, ``mlp``, ``layers``, ``position``). Training maps
these names to mesh axes with one rules table; nothing here knows about devices.
"""
from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .config import ModelConfig


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], std: float | None,
          dtype: jnp.dtype) -> nnx.Param:
    """A weight drawn from N(0, std²), or a zero bias when std is None (biases get no weight decay)."""
    assert len(shape) == len(axes), (shape, axes)
    if std is None:
        return nnx.Param(jnp.zeros(shape, dtype), axes=axes, weight_decay=False)
    value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, axes=axes, weight_decay=True)


def ones_param(shape: tuple[int, ...], axes: tuple[str, ...], dtype: jnp.dtype) -> nnx.Param:
    """A norm scale, initialised to one and exempt from weight decay."""
    return nnx.Param(jnp.ones(shape, dtype), axes=axes, weight_decay=False)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; the identity when no key is given (evaluation and decoding)."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """x / RMS(x) over the last axis, in float32, returned in x's dtype (RMSNorm without its scale)."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt((x32 * x32).mean(-1, keepdims=True) + eps)).astype(x.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """(x − mean) / std · scale + bias over the last axis, with its gradient written out: with x̂ the
    normalised input and g = dy · scale, dx = (g − mean(g) − x̂ · mean(g · x̂)) / std. JAX's own
    derivative of the two-pass form took 3 ms of the small CPU model's 40 ms step (docs/benchmarks.md)."""
    return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
    centred = x - x.mean(-1, keepdims=True)
    inv_std = jax.lax.rsqrt((centred * centred).mean(-1, keepdims=True) + eps)
    normed = centred * inv_std
    return normed * scale + bias, (normed, inv_std, scale)


def _layer_norm_bwd(eps, residuals, dy):
    normed, inv_std, scale = residuals
    lead = tuple(range(dy.ndim - 1))
    g = dy * scale
    dx = inv_std * (g - g.mean(-1, keepdims=True) - normed * (g * normed).mean(-1, keepdims=True))
    return dx, (dy * normed).sum(lead), dy.sum(lead)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class Norm(nnx.Module):
    """LayerNorm (mean-centred, with bias) or RMSNorm, computed in float32 for stability.

    ``size`` / ``axes``: what is normalised (default the model width; QK-norm passes a head or a whole
    projection). With ``model.norm_scale_offset`` (Gemma) RMSNorm multiplies by (1 + w), w stored from 0.
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, size: int | None = None,
                 axes: tuple[str, ...] = ("embed",)):
        self.kind, self.eps, self.offset = cfg.norm, cfg.norm_eps, cfg.norm_scale_offset
        shape = (size or cfg.d_model,)
        self.scale = (nnx.Param(jnp.zeros(shape, cfg.weight_dtype), axes=axes, weight_decay=False) if self.offset
                      else ones_param(shape, axes, cfg.weight_dtype))
        if cfg.norm == "layernorm":
            self.bias = param(rngs, shape, axes, None, cfg.weight_dtype)

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        x, scale = x_btd.astype(jnp.float32), self.scale[...].astype(jnp.float32)
        if self.kind == "layernorm":
            return layer_norm(x, scale, self.bias[...].astype(jnp.float32), self.eps).astype(x_btd.dtype)
        return (rms_normalize(x, self.eps) * (1.0 + scale if self.offset else scale)).astype(x_btd.dtype)


def dense(x: jax.Array, w: jax.Array, n_in: int = 1) -> jax.Array:
    """Contract the last ``n_in`` axes of ``x`` with the first ``n_in`` of ``w``, e.g. btd,df->btf.

    Written as one 2-D matmul [rows, in] @ [in, out] rather than a batched einsum: XLA:CPU lowers the
    weight gradient of the 3-D einsum through transposed copies of the activations that took longer
    than the matmuls themselves (docs/benchmarks.md); the 2-D form needs none. Same math.
    """
    lead, size_in = x.shape[:x.ndim - n_in], math.prod(x.shape[x.ndim - n_in:])
    y = x.reshape(-1, size_in) @ w.reshape(size_in, -1)
    return y.reshape(*lead, *w.shape[n_in:])


class Mlp(nnx.Module):
    """Position-wise feed-forward: widen to d_ff, apply ReLU/GELU (or gate with SwiGLU / GeGLU), narrow back."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f, std, wd = cfg.d_model, cfg.d_ff, cfg.init_std, cfg.weight_dtype
        self.activation, self.dtype = cfg.activation, cfg.compute_dtype
        self.wi = param(rngs, (d, f), ("embed", "mlp"), std, wd)
        if cfg.activation in ("swiglu", "geglu"):
            self.wg = param(rngs, (d, f), ("embed", "mlp"), std, wd)
        self.wo = param(rngs, (f, d), ("mlp", "embed"), std / math.sqrt(2 * cfg.n_layers), wd)
        self.bi = param(rngs, (f,), ("mlp",), None, wd) if cfg.use_bias else None
        self.bo = param(rngs, (d,), ("embed",), None, wd) if cfg.use_bias else None

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        h_btf = dense(x_btd, self.wi[...].astype(self.dtype))
        if self.bi is not None:
            h_btf = h_btf + self.bi[...].astype(self.dtype)
        if self.activation in ("swiglu", "geglu"):
            gate_btf = dense(x_btd, self.wg[...].astype(self.dtype))
            gate_btf = jax.nn.silu(gate_btf) if self.activation == "swiglu" else jax.nn.gelu(gate_btf, approximate=True)
            h_btf = gate_btf * h_btf
        elif self.activation == "gelu":
            h_btf = jax.nn.gelu(h_btf, approximate=True)  # GPT-2's tanh approximation
        else:
            h_btf = jax.nn.relu(h_btf)
        out_btd = dense(h_btf, self.wo[...].astype(self.dtype))
        if self.bo is not None:
            out_btd = out_btd + self.bo[...].astype(self.dtype)
        return out_btd


def sinusoidal_embedding(positions_bt: jax.Array, d_model: int) -> jax.Array:
    """The original Transformer's fixed positions: sin on the first half of features, cos on the second."""
    half = d_model // 2
    inv_freq = jnp.exp(-math.log(10_000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    angles_bth = positions_bt[..., None].astype(jnp.float32) * inv_freq
    emb = jnp.concatenate([jnp.sin(angles_bth), jnp.cos(angles_bth)], axis=-1)
    return jnp.pad(emb, [(0, 0), (0, 0), (0, d_model - 2 * half)])


def rope_frequencies(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies theta^(-2i/k) of the k/2 rotated feature pairs, rescaled for long contexts.

    linear: every frequency / rope_factor (positions stretched). llama3 (Llama 3.1): wavelengths
    2*pi/f longer than L/low_freq_factor (L = rope_original_max_len) are divided by rope_factor,
    shorter than L/high_freq_factor kept, and the band between blended linearly in L/wavelength.
    Computed once from the config in float64 (Hugging Face's modeling_rope_utils does the same in float32).
    """
    half = cfg.head_size // 2
    inv_freq = cfg.rope_theta ** (-np.arange(half, dtype=np.float64) / half)
    if cfg.rope_scaling == "linear":
        return inv_freq / cfg.rope_factor
    if cfg.rope_scaling == "llama3":
        low, high, factor = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (cfg.rope_original_max_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = np.where(wavelen > cfg.rope_original_max_len / low, inv_freq / factor,
                            np.where(wavelen < cfg.rope_original_max_len / high, inv_freq, blended))
    return inv_freq


def rope_angles(positions_bt: jax.Array, inv_freq_h: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables [B, T, head_size/2] for rotary position embeddings (see rope_frequencies)."""
    angles_bth = positions_bt[..., None].astype(jnp.float32) * jnp.asarray(inv_freq_h, jnp.float32)
    return jnp.cos(angles_bth), jnp.sin(angles_bth)


def apply_rope(x_bthk: jax.Array, cos_sin: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotate feature pairs (i, i + k/2) by position-dependent angles (the "rotate half" layout of Llama)."""
    cos, sin = (a[:, :, None, :] for a in cos_sin)  # broadcast over heads
    x = x_bthk.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_bthk.dtype)


def write_rows(buffer, update, index, axis: int):
    """``buffer`` with ``update`` written from ``index`` on along ``axis`` (the cache's length axis, batch just
    before it): at one position for every row (index []), or at each row's own (index [B])."""
    if jnp.ndim(index) == 0:
        start = [0] * buffer.ndim
        start[axis] = index
        return jax.lax.dynamic_update_slice(buffer, update.astype(buffer.dtype), start)
    def one_row(buffer_row, update_row, i):
        start = [0] * buffer_row.ndim
        start[axis - 1] = i
        return jax.lax.dynamic_update_slice(buffer_row, update_row.astype(buffer_row.dtype), start)
    return jax.vmap(one_row, in_axes=(axis - 1, axis - 1, 0), out_axes=axis - 1)(buffer, update, index)
