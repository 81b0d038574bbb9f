"""The encoder-only and encoder-decoder shapes against float64 NumPy, and their decoding.

The NumPy reference is written here from the textbook definitions (reusing test_model's pieces for
norms, MLPs and positions); the code under test is qkv.model.
"""
from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_reference import np_rms
from test_model import (np_mask, np_mlp, np_norm, np_rope, np_sinusoidal, np_softmax_attention, randomize)

from qkv.model import Encoder, EncoderDecoder, ModelConfig, create_model, init_cache, split_params
from qkv.inference.decode import SamplingConfig
from qkv.inference.decode import Seq2SeqDecoder

pytestmark = pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")

S, T = 7, 6  # source and target lengths
ENC = ModelConfig(kind="encoder", vocab_size=41, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=32,
                  max_seq_len=16)
# BERT-like: learned positions, post-norm LayerNorm, GELU, biases, untied head, mean pooling classifier
BERT = ENC.replace(positions="learned", norm="layernorm", norm_position="post", activation="gelu", use_bias=True,
                   tie_embeddings=False, n_kv_heads=None, n_classes=3, pooling="mean")
# the original Transformer: sinusoidal, post-norm LayerNorm, ReLU; a deeper encoder than decoder
ORIGINAL = ModelConfig(kind="encoder_decoder", vocab_size=41, d_model=16, n_layers=2, n_encoder_layers=3,
                       n_heads=4, d_ff=32, max_seq_len=16, positions="sinusoidal", norm="layernorm",
                       norm_position="post", activation="relu", use_bias=True)
# pre-norm, RoPE in self-attention, RMSNorm, SwiGLU, GQA, QK-norm (cross-attention's keys too)
MODERN = ORIGINAL.replace(positions="rope", norm="rmsnorm", norm_position="pre", activation="swiglu",
                          use_bias=False, n_kv_heads=2, n_encoder_layers=None, qk_norm=True)
SEQ2SEQ = {"original": ORIGINAL, "modern": MODERN}


@functools.lru_cache(maxsize=None)
def build(cfg: ModelConfig, seed: int = 0):
    graphdef, params = split_params(create_model(cfg, seed))
    return graphdef, randomize(params, seed)


def ints(shape, high, seed):
    return np.random.default_rng(seed).integers(5, high, shape).astype(np.int32)


# ----------------------------------------------------------------------------- float64 NumPy reference


def np_attention(cfg, x, p, positions, mask, memory=None):
    """Self-attention (keys/values from x, rotary if configured) or cross-attention (from memory, no rope)."""
    def proj(src, w, b):
        y = np.einsum("btd,dhe->bthe", src, p[w])
        return y + p[b] if cfg.use_bias else y

    source = x if memory is None else memory
    q, k, v = proj(x, "wq", "bq"), proj(source, "wk", "bk"), proj(source, "wv", "bv")
    if cfg.qk_norm != "none":
        q, k = np_rms(q, cfg.norm_eps), np_rms(k, cfg.norm_eps)
    if cfg.positions == "rope" and memory is None:
        q, k = np_rope(q, positions, cfg.rope_theta), np_rope(k, positions, cfg.rope_theta)
    out = np.einsum("bthe,hed->btd", np_softmax_attention(q, k, v, mask), p["wo"])
    return out + p["bo"] if cfg.use_bias else out


def np_sublayer(cfg, x, norm_p, fn):
    return x + fn(np_norm(cfg, x, norm_p)) if cfg.norm_position == "pre" else np_norm(cfg, x + fn(x), norm_p)


def np_stack(cfg, p, blocks, x, positions, mask, n_layers, memory=None, cross_mask=None):
    for layer in range(n_layers):
        lp = jax.tree.map(lambda a: a[layer], blocks)
        x = np_sublayer(cfg, x, lp["attn_norm"], lambda h: np_attention(cfg, h, lp["attn"], positions, mask))
        if memory is not None:
            x = np_sublayer(cfg, x, lp["cross_norm"],
                            lambda h: np_attention(cfg, h, lp["cross_attn"], None, cross_mask, memory))
        x = np_sublayer(cfg, x, lp["mlp_norm"], lambda h: np_mlp(cfg, h, lp["mlp"]))
    return x


def np_embed(cfg, p, tokens, positions):
    x = p["embed"][tokens]
    if cfg.positions == "learned":
        x = x + p["pos_embed"][positions]
    elif cfg.positions == "sinusoidal":
        x = x + np_sinusoidal(positions.astype(np.float64), cfg.d_model)
    return x


def same_segment(q_seg, k_seg):
    return np.asarray(q_seg)[:, :, None] == np.asarray(k_seg)[:, None, :]


def np_encode(cfg, p, tokens, segments, blocks="blocks", norm="final_norm", n_layers=None):
    positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
    x = np_stack(cfg, p, p[blocks], np_embed(cfg, p, tokens, positions), positions, same_segment(segments, segments),
                 n_layers or cfg.n_layers)
    return np_norm(cfg, x, p[norm]) if cfg.norm_position == "pre" else x


def np_seq2seq(cfg, params, src, src_seg, tgt, tgt_seg):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    memory = np_encode(cfg, p, src, src_seg, "encoder_blocks", "encoder_norm", cfg.encoder_layers)
    positions = np.broadcast_to(np.arange(tgt.shape[1]), tgt.shape)
    cross = same_segment(tgt_seg, src_seg)
    cross[~cross.any(-1)] = True  # padding that sees no source: any finite value (unused), not NaN (0 · NaN spreads)
    x = np_stack(cfg, p, p["blocks"], np_embed(cfg, p, tgt, positions), positions, np_mask(tgt_seg), cfg.n_layers,
                 memory, cross)
    if cfg.norm_position == "pre":
        x = np_norm(cfg, x, p["final_norm"])
    return x @ p["embed"].T if cfg.tie_embeddings else x @ p["lm_head"]


# ----------------------------------------------------------------------------- encoder-decoder


def seq2seq_batch(cfg):
    """Row 0: one example with a padded source; row 1: two packed examples (segments 1, 2) and padding."""
    src, tgt = ints((2, S), cfg.vocab_size, 1), ints((2, T), cfg.vocab_size, 2)
    src_seg = np.array([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 2, 2, 2, 2]], np.int32)
    tgt_seg = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 2, 2, 2, 0]], np.int32)
    return src, src_seg, tgt, tgt_seg


@pytest.mark.parametrize("name", list(SEQ2SEQ))
def test_encoder_decoder_forward_matches_numpy(name):
    cfg = SEQ2SEQ[name]
    graphdef, params = build(cfg)
    src, src_seg, tgt, tgt_seg = seq2seq_batch(cfg)
    model = nnx.merge(graphdef, params)
    # segment-relative positions are what the data pipeline gives packed rows; the reference restarts none,
    # so compare with 0..L-1 positions here (packing's position restart is covered by the decoder tests)
    batch = {"src_inputs": src, "src_segment_ids": src_seg, "src_positions": np.broadcast_to(np.arange(S), (2, S)),
             "inputs": tgt, "segment_ids": tgt_seg, "positions": np.broadcast_to(np.arange(T), (2, T))}
    got = np.asarray(jax.jit(lambda p, b: nnx.merge(graphdef, p).forward_batch(b))(params, batch))
    want = np_seq2seq(cfg, params, src, src_seg, tgt, tgt_seg)
    real = tgt_seg > 0  # padding attends to nothing real (NaN in the reference); its values are never used
    assert np.abs(want[real]).max() > 1.0 and isinstance(model, EncoderDecoder)
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=1e-4)


def test_cross_attention_sees_every_source_token_and_decoder_no_future_target():
    cfg = MODERN
    graphdef, params = build(cfg)
    src, tgt = ints((1, S), cfg.vocab_size, 3), ints((1, T), cfg.vocab_size, 4)

    def outputs(src_emb, tgt_emb):  # logits as a function of the embedded source and target
        model = nnx.merge(graphdef, params)
        return _decode_embedded(model, tgt_emb, _encode_embedded(model, src_emb))

    emb = np.asarray(params["embed"])
    src_emb, tgt_emb = jnp.asarray(emb[src]), jnp.asarray(emb[tgt])
    i = 2  # a middle target position
    d_src, d_tgt = jax.jit(jax.grad(lambda a, b: outputs(a, b)[0, i].sum(), argnums=(0, 1)))(src_emb, tgt_emb)
    src_norms, tgt_norms = np.linalg.norm(d_src[0], axis=-1), np.linalg.norm(d_tgt[0], axis=-1)
    assert (src_norms > 1e-6).all(), src_norms  # every source token, before and after, matters
    assert (tgt_norms[:i + 1] > 1e-6).all() and (tgt_norms[i + 1:] == 0).all(), tgt_norms


def _encode_embedded(model, x_bsd):
    from qkv.model.attention import attention_mask
    from qkv.model.layers import rope_angles, rope_frequencies
    from qkv.model.transformer import run_blocks
    cfg = model.cfg
    b, s = x_bsd.shape[:2]
    positions = jnp.broadcast_to(jnp.arange(s), (b, s))
    segments = jnp.ones((b, s), jnp.int32)
    x, _ = run_blocks(cfg, model.encoder_blocks, x_bsd, attention_mask(None, segments, segments),
                      rope_angles(positions, rope_frequencies(cfg)))
    return model.encoder_norm(x)


def _decode_embedded(model, x_btd, memory_bsd):
    from qkv.model.attention import attention_mask
    from qkv.model.layers import rope_angles, rope_frequencies
    from qkv.model.transformer import run_blocks
    cfg = model.cfg
    b, t = x_btd.shape[:2]
    slots = jnp.broadcast_to(jnp.arange(t), (b, t))
    segments = jnp.ones((b, t), jnp.int32)
    mem_seg = jnp.ones(memory_bsd.shape[:2], jnp.int32)
    x, _ = run_blocks(cfg, model.blocks, x_btd, attention_mask(slots, segments, segments),
                      rope_angles(slots, rope_frequencies(cfg)),
                      memory=(memory_bsd, attention_mask(None, segments, mem_seg)))
    return model.vocab_logits(model.final(x))


@pytest.mark.parametrize("name", list(SEQ2SEQ))
def test_cached_decoding_with_cross_kv_matches_full_forward(name):
    cfg = SEQ2SEQ[name]
    graphdef, params = build(cfg)
    src, _, tgt, _ = seq2seq_batch(cfg)
    src_seg = np.array([[1] * 5 + [0] * 2, [1] * S], np.int32)
    model = nnx.merge(graphdef, params)
    memory_bsd = model.encode(src, None, src_seg)
    full = np.asarray(model(tgt, memory=(memory_bsd, src_seg))[0])
    memory_kv = model.memory_kv(memory_bsd)  # projected once, reused by every step
    assert memory_kv[0].shape == (cfg.n_layers, 2, S, cfg.num_kv_heads, cfg.head_size)
    cache = init_cache(cfg, 2, T + 2)
    for i in range(T):
        logits, cache = model(tgt[:, i:i + 1], cache=cache, memory=(memory_kv, src_seg))
        np.testing.assert_allclose(np.asarray(logits[:, 0]), full[:, i], atol=1e-5, rtol=1e-5, err_msg=f"step {i}")


def teacher_forced_logits(graphdef, params, source, target):
    """log-softmax [len(target), vocab] of the full forward pass on one source and decoder input [bos] + target."""
    @jax.jit
    def run(p, src, tgt):
        model = nnx.merge(graphdef, p)
        memory = (model.encode(src), jnp.ones_like(src))
        return jax.nn.log_softmax(model(tgt, memory=memory)[0][0])

    return np.asarray(run(params, np.asarray([source], np.int32), np.asarray([[2] + target], np.int32)))


def test_greedy_translation_matches_stepwise_argmax_and_batching():
    cfg = MODERN
    graphdef, params = build(cfg)
    sources = [[7, 8, 9, 10, 11], [12, 13]]
    decoder = Seq2SeqDecoder(cfg, graphdef, SamplingConfig(temperature=0.0, max_new_tokens=6))
    both = decoder.generate(params, sources, bos_id=2, eos_id=3)
    for source, out in zip(sources, both):
        # the full (uncached) forward pass on this source alone picks every generated token by argmax,
        # and after the last one picks eos (or the budget ran out)
        picks = teacher_forced_logits(graphdef, params, source, out).argmax(-1)
        assert picks[:len(out)].tolist() == out and (len(out) == 6 or picks[len(out)] == 3), (out, picks)
    assert decoder.generate(params, sources[1:], bos_id=2, eos_id=3) == both[1:]


def test_beam_size_one_is_greedy_and_beams_score_at_least_greedy():
    cfg = MODERN
    graphdef, params = build(cfg, seed=3)
    sources = [[7, 8, 9, 10], [20, 21, 22, 23, 24, 25]]
    greedy = Seq2SeqDecoder(cfg, graphdef, SamplingConfig(temperature=0.0, max_new_tokens=5))
    beam1 = Seq2SeqDecoder(cfg, graphdef, SamplingConfig(temperature=0.0, max_new_tokens=5), beam_size=1)
    assert greedy.generate(params, sources, 2, 3) == beam1.generate(params, sources, 2, 3)
    beam4 = Seq2SeqDecoder(cfg, graphdef, SamplingConfig(max_new_tokens=5), beam_size=4, length_penalty=0.0)

    def logprob(source, target):  # log p(target (+ eos unless the budget ran out) | source), teacher-forced
        logp = teacher_forced_logits(graphdef, params, source, target)
        seq = target + ([3] if len(target) < 5 else [])
        return sum(logp[i, t] for i, t in enumerate(seq))

    for source, g, b in zip(sources, greedy.generate(params, sources, 2, 3), beam4.generate(params, sources, 2, 3)):
        assert logprob(source, b) >= logprob(source, g) - 1e-4


def test_seq2seq_decoder_refuses_other_shapes_and_bad_sources():
    graphdef, _ = build(ENC)
    with pytest.raises(ValueError, match="encoder_decoder checkpoint"):
        Seq2SeqDecoder(ENC, graphdef, SamplingConfig())
    graphdef, params = build(MODERN)
    decoder = Seq2SeqDecoder(MODERN, graphdef, SamplingConfig(max_new_tokens=2))
    with pytest.raises(ValueError, match="empty source"):
        decoder.generate(params, [[5], []], 2, 3)
    with pytest.raises(ValueError, match="exceeds the model's context of 16"):
        decoder.generate(params, [[5] * 17], 2, 3)


# ----------------------------------------------------------------------------- encoder-only


@pytest.mark.parametrize("cfg", [ENC, BERT], ids=["rope-prenorm", "bert"])
def test_encoder_matches_numpy_and_is_bidirectional(cfg):
    graphdef, params = build(cfg)
    tokens = ints((2, S), cfg.vocab_size, 5)
    segments = np.array([[1] * S, [1, 1, 1, 2, 2, 0, 0]], np.int32)
    model = nnx.merge(graphdef, params)
    assert isinstance(model, Encoder)
    hidden = np.asarray(model.encode(tokens, None, segments))
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    want = np_encode(cfg, p, tokens, segments)
    real = segments > 0
    np.testing.assert_allclose(hidden[real], want[real], atol=1e-4, rtol=1e-4)
    logits = np.asarray(model(tokens, None, segments)[0])
    head = p["embed"].T if cfg.tie_embeddings else p["lm_head"]
    np.testing.assert_allclose(logits[real], (want @ head)[real], atol=1e-4, rtol=1e-4)
    # bidirectional within a segment, blind across: changing token 4 of row 1 (segment 2) moves
    # position 3 (same segment, earlier) and leaves positions 0-2 (segment 1) untouched
    changed = tokens.copy()
    changed[1, 4] = (changed[1, 4] + 1 - 5) % (cfg.vocab_size - 5) + 5
    other = np.asarray(model.encode(changed, None, segments))
    assert np.abs(other[1, 3] - hidden[1, 3]).max() > 1e-4
    np.testing.assert_allclose(other[1, :3], hidden[1, :3], atol=1e-6)


def test_classifier_pooling_and_head():
    graphdef, params = build(BERT)
    model = nnx.merge(graphdef, params)
    tokens = ints((2, S), BERT.vocab_size, 6)
    segments = np.array([[1] * S, [1, 1, 1, 0, 0, 0, 0]], np.int32)
    hidden = np.asarray(model.encode(tokens, None, segments), np.float64)
    pooled = np.stack([hidden[0].mean(0), hidden[1, :3].mean(0)])  # mean over real tokens only
    want = pooled @ np.asarray(params["cls_head"], np.float64) + np.asarray(params["cls_bias"], np.float64)
    np.testing.assert_allclose(np.asarray(model.classify(tokens, None, segments)), want, atol=1e-4, rtol=1e-4)
    first = nnx.merge(*build(BERT.replace(pooling="first")))
    want_first = np.asarray(first.encode(tokens, None, segments))[:, 0] @ np.asarray(params["cls_head"]) \
        + np.asarray(params["cls_bias"])
    np.testing.assert_allclose(np.asarray(first.classify(tokens, None, segments)), want_first, atol=1e-4, rtol=1e-4)
    batch = {"inputs": tokens, "positions": np.broadcast_to(np.arange(S), (2, S)), "segment_ids": segments}
    assert model.forward_batch(batch).shape == (2, 1, 3)


def test_encoder_refuses_decoding_and_missing_head():
    graphdef, params = build(ENC)
    model = nnx.merge(graphdef, params)
    with pytest.raises(ValueError, match="does not generate text"):
        model(np.ones((1, 2), np.int32), cache=init_cache(ENC, 1, 4))
    with pytest.raises(ValueError, match="no classification head"):
        model.classify(np.ones((1, 2), np.int32))


@pytest.mark.parametrize("changes, key", [
    ({"kind": "bert"}, "model.kind"),
    ({"n_classes": 1, "kind": "encoder"}, "model.n_classes"),
    ({"n_classes": 3}, "model.n_classes"),  # a head on a decoder
    ({"pooling": "max"}, "model.pooling"),
    ({"n_encoder_layers": 0}, "model.n_encoder_layers"),
])
def test_shape_config_errors_name_the_key(changes, key):
    with pytest.raises(ValueError, match=key):
        ModelConfig(**changes)


def test_parameter_trees_of_the_three_shapes():
    dec = split_params(create_model(MODERN.replace(kind="decoder", n_encoder_layers=None)))[1]
    enc = split_params(create_model(ENC))[1]
    s2s = split_params(create_model(ORIGINAL))[1]
    assert set(enc) == {"embed", "blocks", "final_norm"} and set(dec) == {"embed", "blocks", "final_norm"}
    assert "cross_attn" in s2s["blocks"] and "cross_attn" not in s2s["encoder_blocks"]
    assert s2s["encoder_blocks"]["attn"]["wq"].shape[0] == 3 and s2s["blocks"]["attn"]["wq"].shape[0] == 2
    assert list(itertools.islice(sorted(s2s), 3)) == ["blocks", "embed", "encoder_blocks"]


def test_encoder_decoder_scan_remat_and_bf16_variants_agree():
    """Layer scan vs unrolled, remat, and bf16 compute: one parameter layout, the same function."""
    src, src_seg, tgt, tgt_seg = seq2seq_batch(MODERN)
    batch = {"src_inputs": src, "src_segment_ids": src_seg, "src_positions": np.broadcast_to(np.arange(S), (2, S)),
             "inputs": tgt, "segment_ids": tgt_seg, "positions": np.broadcast_to(np.arange(T), (2, T))}
    _, params = build(MODERN)

    def loss_and_grads(cfg):
        graphdef = split_params(create_model(cfg))[0]
        f = jax.jit(jax.value_and_grad(lambda p: jnp.mean(nnx.merge(graphdef, p).forward_batch(batch)[tgt_seg > 0]
                                                          ** 2)))
        return f(params)

    ref_loss, ref_grads = loss_and_grads(MODERN)
    for changes in ({"scan_layers": False}, {"remat": "full"}, {"remat": "dots", "scan_layers": False}):
        loss, grads = loss_and_grads(MODERN.replace(**changes))
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5, err_msg=str(changes))
    bf16, _ = loss_and_grads(MODERN.replace(dtype="bfloat16"))
    assert abs(float(bf16) - float(ref_loss)) < 0.05 * abs(float(ref_loss))
