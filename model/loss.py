"""Cross-entropy over the vocabulary, with the output projection inside, in sequence chunks.

The full loss materialises float32 logits ``[B, T, V]`` (and, for the backward pass, their softmax
and gradient): at T=8192 and a 128k vocabulary that is 4 GiB per row, three times over. The chunked
loss splits the sequence into chunks of ``C`` positions and, for each chunk in turn (``lax.map``),
projects the final hidden states to logits, takes the loss and throws the logits away; the chunk
is rematerialised (``jax.checkpoint``) in the backward pass, so peak logits memory is ``B × C × V``.
Same math, same float32 accumulation, so losses and gradients equal the full loss to rounding.

``model.loss_chunk``: -1 (auto) chunks when ``T × V`` exceeds ``AUTO_LIMIT`` elements per row, with
the largest chunk under it; 0 never chunks; N > 0 uses chunks of N positions. Families whose logits
are not a vocabulary projection of hidden states (an encoder's classifier) always take the full path.

The projection contracts in the compute dtype and accumulates in float32
(``preferred_element_type``), so bf16 compute no longer rounds the logits to bf16 before the loss.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from .constrain import constrain

AUTO_LIMIT = 1 << 25  # positions x vocabulary per row above which auto chunks (32M floats = 128 MiB)
LOGITS = ("batch", "length", "vocab")


def token_losses(logits_btv: jax.Array, targets_bt: jax.Array, z_loss: float = 0.0,
                 label_smoothing: float = 0.0, softcap: float = 0.0) -> jax.Array:
    """Per-token cross-entropy −log softmax(logits)[target] (+ z_loss · logZ²), float32 [B, T].

    With label smoothing ε the target distribution is (1 − ε)·onehot + ε/V, so the loss is
    logZ − (1 − ε)·logit[target] − ε·mean(logits). With ``softcap`` > 0 the logits given are the raw
    projection and are capped here (``capped_token_losses``).
    """
    if softcap:
        return capped_token_losses(logits_btv, targets_bt, softcap, z_loss, label_smoothing)
    log_z_bt = jax.nn.logsumexp(logits_btv, axis=-1)
    target_logit_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
    if label_smoothing:
        target_logit_bt = (1 - label_smoothing) * target_logit_bt + label_smoothing * jnp.mean(logits_btv, axis=-1)
    return log_z_bt - target_logit_bt + z_loss * jnp.square(log_z_bt)


def target_is_top(logits_btv: jax.Array, targets_bt: jax.Array) -> jax.Array:
    """Whether the target's logit is the largest [B, T] (accuracy's hit; a tie for the top counts as one).

    Not ``argmax == target``: XLA:CPU runs argmax's (value, index) reduction as a scalar loop, which took
    longer than the output projection's matmul in the default job's evaluation (147 vs 120 ms per batch).
    """
    target_logit_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
    return target_logit_bt >= jnp.max(logits_btv, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def capped_token_losses(raw_btv: jax.Array, targets_bt: jax.Array, softcap: float, z_loss: float = 0.0,
                        label_smoothing: float = 0.0) -> jax.Array:
    """``token_losses`` of the capped logits ``z = softcap · tanh(raw / softcap)``, with its gradient
    written out.

    The math is autodiff's: dz = (1 + 2·z_loss·logZ)·softmax(z) − ε/V − (1 − ε)·onehot, then
    d raw = dz · (1 − tanh²). Written by hand only for the order of the work: autodiff applies the
    cap's factor after the target's scatter, and XLA:CPU then fuses that multiply into the transposing
    copy that feeds the weight gradient's matmul, a loop it runs ~10× slower than a plain copy (the
    16k-vocabulary default step took 1.75× as long with the cap). Here the factor is applied before
    the scatter, and the cap costs about one elementwise pass.
    """
    return _capped_forward(raw_btv, targets_bt, softcap, z_loss, label_smoothing)[0]


def _capped_forward(raw_btv, targets_bt, softcap, z_loss, label_smoothing):
    z_btv = softcap * jnp.tanh(raw_btv / softcap)
    log_z_bt = jax.nn.logsumexp(z_btv, axis=-1)
    losses_bt = token_losses(z_btv, targets_bt, z_loss, label_smoothing)
    return losses_bt, (raw_btv, targets_bt, jax.lax.stop_gradient(log_z_bt))


def _capped_backward(softcap, z_loss, label_smoothing, residuals, g_bt):
    raw_btv, targets_bt, log_z_bt = residuals
    t_btv = jnp.tanh(raw_btv / softcap)
    slope_btv = 1 - jnp.square(t_btv)  # d z / d raw
    p_btv = jnp.exp(softcap * t_btv - log_z_bt[..., None])
    g_bt1 = g_bt[..., None]
    draw_btv = (g_bt1 * (1 + 2 * z_loss * log_z_bt[..., None]) * p_btv - g_bt1 * label_smoothing / p_btv.shape[-1])
    draw_btv = draw_btv * slope_btv
    at_target = targets_bt[..., None]
    hit_bt1 = g_bt1 * (1 - label_smoothing) * jnp.take_along_axis(slope_btv, at_target, axis=-1)
    draw_btv = jnp.put_along_axis(draw_btv, at_target, jnp.take_along_axis(draw_btv, at_target, axis=-1) - hit_bt1,
                                  axis=-1, inplace=False)
    return draw_btv.astype(raw_btv.dtype), None


capped_token_losses.defvjp(_capped_forward, _capped_backward)


def project(x_btd: jax.Array, w: jax.Array, tied: bool, softcap: float = 0.0) -> jax.Array:
    """Float32 logits [B, T, V]: hidden states times the output weights (tied: the embedding [V, D]),
    squashed into (−softcap, softcap) by ``softcap · tanh(logits / softcap)`` when ``softcap`` > 0."""
    spec = "btd,vd->btv" if tied else "btd,dv->btv"
    logits_btv = jnp.einsum(spec, x_btd, w.astype(x_btd.dtype), preferred_element_type=jnp.float32)
    if softcap:
        logits_btv = softcap * jnp.tanh(logits_btv / softcap)
    return constrain(logits_btv, LOGITS)


def chunk_length(loss_chunk: int, seq_len: int, vocab: int) -> int:
    """Positions per chunk for ``model.loss_chunk`` (0: one chunk, the full loss)."""
    if loss_chunk > 0:
        return min(loss_chunk, seq_len)
    if loss_chunk == 0 or seq_len * vocab <= AUTO_LIMIT:
        return 0
    return max(AUTO_LIMIT // vocab, 1)


def chunked_token_losses(x_btd: jax.Array, w: jax.Array, tied: bool, targets_bt: jax.Array, chunk: int,
                         z_loss: float = 0.0, label_smoothing: float = 0.0,
                         softcap: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """(per-token losses [B, T], target is the top logit [B, T]) computed ``chunk`` positions at a time.

    The sequence is padded to a multiple of ``chunk`` (padded positions are dropped at the end).
    """
    b, t, d = x_btd.shape
    n = -(-t // chunk)
    pad = n * chunk - t
    x_nbcd = jnp.pad(x_btd, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d).swapaxes(0, 1)
    targets_nbc = jnp.pad(targets_bt, ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)
    # the projection gathered over the model dimension once, here: left to XLA, an fsdp-sharded projection was
    # all-gathered inside the loop, once per chunk, by the GPU, TPU and CPU compilers alike (docs/scaling.md)
    w = constrain(w.astype(x_btd.dtype), ("vocab", None) if tied else (None, "vocab"))

    @jax.checkpoint  # keep only the chunk's inputs; recompute its logits in the backward pass
    def one_chunk(xs):
        x_bcd, targets_bc = xs
        raw_bcv = project(x_bcd, w, tied)  # the cap is applied inside the loss; the top logit does not change under it
        hits_bc = target_is_top(raw_bcv, targets_bc)
        return token_losses(raw_bcv, targets_bc, z_loss, label_smoothing, softcap), hits_bc

    losses_nbc, hits_nbc = jax.lax.map(one_chunk, (x_nbcd, targets_nbc))
    unchunk = lambda a: a.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]  # noqa: E731
    return unchunk(losses_nbc), unchunk(hits_nbc)


def batch_token_losses(model: Any, batch: dict[str, jax.Array], dropout_key: jax.Array | None,
                       z_loss: float = 0.0, label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """(per-token losses, target is the top logit) of one batch against ``batch["targets"]``, both [B, T].

    Where the model's logits are a vocabulary projection (``model.forward_hidden`` returns hidden
    states), from the hidden states: in one piece, or chunked (``model.loss_chunk``). The full logits
    otherwise (an encoder's classifier).
    """
    targets_bt, cfg = batch["targets"], model.cfg
    hidden = model.forward_hidden(batch, dropout_key)
    if hidden is None:
        logits_btv = model.forward_batch(batch, dropout_key)
        return (token_losses(logits_btv, targets_bt, z_loss, label_smoothing),
                target_is_top(logits_btv, targets_bt))
    w, tied = model.output_weights()
    chunk = chunk_length(cfg.loss_chunk, targets_bt.shape[1], cfg.vocab_size)
    if chunk:
        return chunked_token_losses(hidden, w, tied, targets_bt, chunk, z_loss, label_smoothing, cfg.logit_softcap)
    raw_btv = project(hidden, w, tied)
    return (token_losses(raw_btv, targets_bt, z_loss, label_smoothing, cfg.logit_softcap),
            target_is_top(raw_btv, targets_bt))
