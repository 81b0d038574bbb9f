"""The chunked cross-entropy (model/loss.py) equals the full loss and its gradients; float32 logits
under bf16 compute; auto chunking only where the logits are large."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qkv.model import ModelConfig, create_model, split_params
from qkv.model.loss import AUTO_LIMIT, capped_token_losses, chunk_length, project, token_losses
from qkv.train.objectives import forward_loss_sum

TINY = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=32)


def batch_for(cfg: ModelConfig, b: int = 2, t: int = 13, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    segments = np.ones((b, t), np.int32)
    segments[0, 7:] = 2  # two packed documents in row 0
    segments[1, 10:] = 0  # padding at the end of row 1
    positions = np.where(segments[0] == 2, np.arange(t) - 7, np.arange(t))[None].repeat(b, 0).astype(np.int32)
    batch = {"inputs": rng.integers(0, cfg.vocab_size, (b, t)), "targets": rng.integers(0, cfg.vocab_size, (b, t)),
             "positions": positions, "segment_ids": segments, "loss_mask": (segments > 0) & (rng.random((b, t)) > 0.2)}
    if cfg.kind == "encoder_decoder":
        batch |= {"src_inputs": rng.integers(0, cfg.vocab_size, (b, 9)), "src_positions": np.tile(np.arange(9), (b, 1)),
                  "src_segment_ids": np.ones((b, 9), np.int32)}
    return {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}


def loss_and_grads(cfg: ModelConfig, batch: dict, z_loss: float, smoothing: float):
    graphdef, params = split_params(create_model(cfg, seed=1))
    def f(p):
        loss_sum, count, correct = forward_loss_sum(graphdef, p, batch, None, z_loss, smoothing)
        return loss_sum / count, correct
    (loss, correct), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
    return float(loss), float(correct), grads


@pytest.mark.parametrize("kind, tied, z_loss, smoothing, softcap", [
    ("decoder", True, 0.0, 0.0, 0.0), ("decoder", False, 1e-3, 0.1, 0.0), ("encoder", True, 1e-4, 0.0, 0.0),
    ("encoder_decoder", False, 0.0, 0.1, 0.0), ("decoder", True, 0.0, 0.0, 0.05)])
def test_chunked_loss_equals_full_loss_and_gradients(kind, tied, z_loss, smoothing, softcap):
    batch = batch_for(ModelConfig(kind=kind, **TINY))
    cfg = dict(kind=kind, tie_embeddings=tied, logit_softcap=softcap, **TINY)
    full = loss_and_grads(ModelConfig(loss_chunk=0, **cfg), batch, z_loss, smoothing)
    # 5 does not divide 13: the last chunk is padded, and padded positions must not count
    chunked = loss_and_grads(ModelConfig(loss_chunk=5, **cfg), batch, z_loss, smoothing)
    assert abs(full[0] - chunked[0]) < 1e-6 * abs(full[0])
    assert full[1] == chunked[1]  # the same tokens predicted right by argmax
    for (path, g_full), g_chunk in zip(jax.tree_util.tree_flatten_with_path(full[2])[0], jax.tree.leaves(chunked[2])):
        scale = float(jnp.max(jnp.abs(g_full))) + 1e-12
        assert float(jnp.max(jnp.abs(g_full - g_chunk))) <= 1e-5 * scale, jax.tree_util.keystr(path)


@pytest.mark.parametrize("softcap", [0.0, 0.05])
def test_the_loss_equals_a_float64_numpy_cross_entropy(softcap):
    cfg = ModelConfig(loss_chunk=4, logit_softcap=softcap, **TINY)
    batch = batch_for(cfg)
    model = create_model(cfg, seed=1)
    graphdef, params = split_params(model)
    # the logits from the final hidden states and the output weights, in float64 NumPy
    hidden = np.asarray(model(batch["inputs"], batch["positions"], batch["segment_ids"], hidden=True)[0], np.float64)
    logits = hidden @ np.asarray(model.embed[...], np.float64).T
    if softcap:  # 0.05 is below the random model's largest logits: the cap is active, not a no-op
        assert np.abs(logits).max() > 2 * softcap
        logits = softcap * np.tanh(logits / softcap)
    np.testing.assert_allclose(np.asarray(model.forward_batch(batch), np.float64), logits, rtol=1e-4, atol=1e-6)
    # every third target is the top logit (so accuracy counts something), the rest random
    targets = np.where(np.arange(logits.shape[1]) % 3 == 0, np.argmax(logits, -1), np.asarray(batch["targets"]))
    batch = {**batch, "targets": jnp.asarray(targets, jnp.int32)}
    loss_sum, count, correct = forward_loss_sum(graphdef, params, batch, None)
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    mask = np.asarray(batch["loss_mask"], np.float64)
    assert float(count) == mask.sum()
    np.testing.assert_allclose(float(loss_sum), (nll * mask).sum(), rtol=1e-5)
    top = np.argmax(logits, -1) == targets  # accuracy: the target is the top logit
    assert 0 < (top * mask).sum() and float(correct) == (top * mask).sum()


@pytest.mark.parametrize("z_loss, smoothing", [(0.0, 0.0), (1e-3, 0.1)])
def test_the_capped_loss_gradient_is_autodiffs(z_loss, smoothing):
    """The hand-written gradient of the soft-capped loss (written for XLA:CPU's sake) equals JAX's
    autodiff of the plain formula, with the cap active, z-loss and label smoothing, and a cotangent
    that is not all ones."""
    rng = np.random.default_rng(3)
    raw = jnp.asarray(rng.normal(size=(3, 5, 40)) * 4, jnp.float32)
    targets = jnp.asarray(rng.integers(0, 40, (3, 5)), jnp.int32)
    weights = jnp.asarray(rng.random((3, 5)), jnp.float32)
    cap = 2.0
    assert float(jnp.abs(raw).max()) > 3 * cap  # the cap bends the logits
    plain = lambda r: jnp.sum(weights * token_losses(cap * jnp.tanh(r / cap), targets, z_loss, smoothing))  # noqa: E731
    mine = lambda r: jnp.sum(weights * capped_token_losses(r, targets, cap, z_loss, smoothing))  # noqa: E731
    np.testing.assert_allclose(jax.jit(mine)(raw), jax.jit(plain)(raw), rtol=1e-6)
    g_plain, g_mine = jax.jit(jax.grad(plain))(raw), jax.jit(jax.grad(mine))(raw)
    np.testing.assert_allclose(g_mine, g_plain, rtol=1e-5, atol=1e-6 * float(jnp.abs(g_plain).max()))


def test_bf16_logits_accumulate_in_float32():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 64, 512)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(1000, 512)) * 0.05, jnp.bfloat16)
    exact = np.einsum("btd,vd->btv", np.asarray(x, np.float64), np.asarray(w, np.float64))
    rounded = jnp.einsum("btd,vd->btv", x, w).astype(jnp.float32)  # before: bf16 logits, then the cast
    err_before = np.abs(np.asarray(rounded, np.float64) - exact).max()
    err_now = np.abs(np.asarray(project(x, w, tied=True), np.float64) - exact).max()
    assert project(x, w, tied=True).dtype == jnp.float32
    assert err_now < err_before / 20, (err_now, err_before)


def test_auto_chunks_only_large_logits():
    assert chunk_length(-1, 128, 8192) == 0  # the tiny preset: full logits
    assert chunk_length(-1, 8192, 128256) == AUTO_LIMIT // 128256  # llama: ~261 positions per chunk
    assert chunk_length(0, 8192, 128256) == 0 and chunk_length(512, 256, 10) == 256
    with pytest.raises(ValueError, match="model.loss_chunk"):
        ModelConfig(loss_chunk=-2)
