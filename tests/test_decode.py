"""Decoding tests: left padding, batched greedy decoding and beam search against an uncached float64
NumPy forward, prompt checks, and the sampler's filters (top-k, top-p, temperature) against softmax.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qkv.inference.decode import Decoder, SamplingConfig, beam_generate, left_pad, sample_logits, trim_at_eos
from model_reference import (  # noqa: F401
    CONFIGS,
    LEARNED,
    PACKED_POSITIONS,
    PACKED_SEGMENTS,
    ROPE,
    SINUSOIDAL,
    T,
    build,
    jit_forward,
    np_attention_block,
    np_forward,
    np_mask,
    np_mlp,
    np_norm,
    np_rope,
    np_sinusoidal,
    np_softmax_attention,
    randomize,
    tokens_for,
)

# Donation is a no-op on CPU and JAX warns about it on every Decoder call.
pytestmark = pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")


def test_left_pad():
    tokens, segments = left_pad([[5, 6, 7], [8], [1, 2]], pad_id=0)
    np.testing.assert_array_equal(tokens, [[5, 6, 7], [0, 0, 8], [0, 1, 2]])
    np.testing.assert_array_equal(segments, [[1, 1, 1], [0, 0, 1], [0, 1, 1]])


@pytest.mark.parametrize("name", ["learned", "rope", "windowed"])
def test_batched_greedy_decoding_matches_each_prompt_alone(name):
    """Left-padded batch + KV cache == argmax of an uncached full forward for each prompt on its own.

    Learned positions make this sensitive to positions counting padding; rope to the padding mask;
    windowed (WINDOWED below) to the sliding window over a padded cache.
    """
    cfg = {**CONFIGS, "windowed": WINDOWED}[name]
    graphdef, params, forward = build(cfg)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(1, cfg.vocab_size, n).tolist() for n in (3, 7, 1, 5)]
    steps = 5
    decoder = Decoder(cfg, graphdef, SamplingConfig(temperature=0.0, max_new_tokens=steps))
    got = decoder.generate(params, prompts, pad_id=0, eos_id=None)

    want = []
    for prompt in prompts:
        seq = list(prompt)
        for _ in range(steps):  # fixed-length buffer (one compile); positions after len(seq) are causal-masked
            buf = np.zeros((1, cfg.max_seq_len), np.int32)
            buf[0, : len(seq)] = seq
            seq.append(int(np.argmax(np.asarray(forward(params, buf)[0])[0, len(seq) - 1])))
        want.append(seq[len(prompt):])
    assert got == want
    assert len({tuple(w) for w in want}) > 1  # the prompts lead to different continuations

    # EOS: generation of a row stops before its first EOS, other rows carry on (same compiled decoder)
    eos = want[1][2]
    got_eos = decoder.generate(params, prompts, pad_id=0, eos_id=eos)
    assert got_eos == [w[: w.index(eos)] if eos in w else w for w in want]
    streamed = list(decoder.stream(params, prompts, pad_id=0, eos_id=None))
    assert np.stack(streamed, 1).tolist() == want


# Gemma-style features: a sliding window of 3 on one of two layers (prompts + 5 steps run past it), its own RoPE
# base, the attention soft-cap, query scale, sandwich (1 + w) norms, GeGLU, embedding scale, per-head QK-norm
WINDOWED = ROPE.replace(sliding_window=3, layer_types=("sliding", "full"), rope_local_theta=100.0, attn_softcap=2.0,
                        query_scale=0.3, sandwich_norm=True, norm_scale_offset=True, activation="geglu",
                        embed_scale=True, qk_norm="head")


@pytest.mark.parametrize("name", ["learned", "rope", "windowed"])
def test_decoder_beam_search_matches_numpy_beam_over_the_full_forward(name):
    """Decoder-only beam search (left-padded batch, prefill, KV cache reordered between beams) returns
    the same best hypothesis as a float64 NumPy beam search whose log-probs come from the uncached
    full forward pass of each prompt alone; beam size 1 is greedy decoding."""
    from test_beam_bleu import EOS, beam_np, log_softmax64

    cfg = {**CONFIGS, "windowed": WINDOWED}[name].replace(vocab_size=7)  # a small vocabulary: EOS ends some beams
    graphdef, params, forward = build(cfg, seed=2)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(2, cfg.vocab_size, n).tolist() for n in (3, 6, 1, 4)]
    steps, k, alpha = 5, 3, 0.6

    def logp_fn(prompt):
        memo = {}

        def logp(prefix, tok):  # log p(tok | prompt + prefix) from the full forward of that sequence alone
            key = tuple(prefix)
            if key not in memo:
                seq = list(prompt) + list(prefix)
                buf = np.zeros((1, cfg.max_seq_len), np.int32)
                buf[0, :len(seq)] = seq
                memo[key] = log_softmax64(np.asarray(forward(params, buf)[0])[0, len(seq) - 1])
            return memo[key][tok]
        return logp

    beam = Decoder(cfg, graphdef, SamplingConfig(max_new_tokens=steps), beam_size=k, length_penalty=alpha)
    got = beam.generate(params, prompts, pad_id=0, eos_id=EOS)
    for prompt, out in zip(prompts, got):
        best = beam_np(logp_fn(prompt), cfg.vocab_size, k, steps, alpha)[0][0]
        assert out == [t for t in best if t != EOS][:len(out)] and (len(out) == steps or best[len(out)] == EOS)
    assert beam.generate(params, prompts[1:2], pad_id=0, eos_id=EOS) == got[1:2]  # rows are independent

    greedy = Decoder(cfg, graphdef, SamplingConfig(temperature=0.0, max_new_tokens=steps))
    tokens, segments = left_pad(prompts, 0)
    beam1 = np.asarray(beam_generate(graphdef, cfg, params, (tokens, segments), EOS, steps, 1, 0.0))  # the beam path, K = 1
    greedy_out = greedy.generate(params, prompts, 0, EOS)
    assert [trim_at_eos(r, EOS) for r in beam1] == greedy_out
    assert got != greedy_out and any(len(r) < steps for r in got)  # the case is not trivial
    with pytest.raises(ValueError, match="use generate"):
        list(beam.stream(params, prompts, pad_id=0, eos_id=EOS))


def test_repeated_decoding_compiles_once_per_shape_bucket():
    """A new Decoder per call (as ``qkv.load(run).generate_ids`` makes one) reuses the compiled prefill and step:
    the same shapes, prompts of other lengths in the same bucket and other budgets trace nothing again."""
    from jax import monitoring

    cfg = ROPE.replace(max_seq_len=32)
    graphdef, params, _ = build(cfg)
    traced = []

    def listen(event, duration, fun_name=None, **_):
        if event == "/jax/core/compile/jaxpr_trace_duration" and fun_name and ("prefill" in fun_name or "step" in fun_name):
            traced.append(fun_name)

    monitoring.register_event_duration_secs_listener(listen)
    try:
        def run(prompts, steps):
            decoder = Decoder(cfg, graphdef, SamplingConfig(temperature=0.0, max_new_tokens=steps))
            return decoder.generate(params, prompts, pad_id=0, eos_id=None)

        first = run([[3, 4, 5], [6, 7, 8]], 6)
        assert len(traced) == 2  # one prefill and one step program
        assert run([[3, 4, 5], [6, 7, 8]], 6) == first and run([[3, 4, 5], [6, 7, 8]], 6) == first
        run([[3, 4, 5, 6, 7], [9]], 5)  # another prompt length and budget in the same buckets
        assert len(traced) == 2, traced
    finally:
        monitoring.unregister_event_duration_listener(listen)


def test_decoder_rejects_empty_and_too_long_prompts():
    graphdef, _, _ = build(ROPE)
    decoder = Decoder(ROPE, graphdef, SamplingConfig(temperature=0.0))
    with pytest.raises(ValueError, match="empty prompt"):
        list(decoder.stream(None, [[1], []], pad_id=0, eos_id=None))
    with pytest.raises(ValueError, match="no room"):
        list(decoder.stream(None, [[1] * ROPE.max_seq_len], pad_id=0, eos_id=None))


# ----------------------------------------------------------------------------- 8. sampling

N_SAMPLES = 4000


def draw(logits_v, temperature, top_k=0, top_p=1.0, seed=0, n=N_SAMPLES):
    logits_bv = jnp.broadcast_to(jnp.asarray(logits_v, jnp.float32), (n, len(logits_v)))
    return np.asarray(sample_logits(logits_bv, jax.random.key(seed), temperature, top_k, top_p))


def frequencies(samples, vocab):
    return np.bincount(samples, minlength=vocab) / len(samples)


def test_greedy_and_top1_are_argmax():
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((64, 20)), jnp.float32)
    want = np.argmax(np.asarray(logits), -1)
    greedy = sample_logits(logits, jax.random.key(0), 0.0, 0, 1.0)
    assert greedy.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(greedy), want)
    for temperature in (0.5, 1.0, 5.0):
        for seed in range(3):
            np.testing.assert_array_equal(np.asarray(sample_logits(logits, jax.random.key(seed), temperature, 1, 1.0)),
                                          want)


def test_top_k_only_samples_the_k_best():
    logits = np.random.default_rng(1).standard_normal(12)
    samples = draw(logits, temperature=2.0, top_k=3)
    best = set(np.argsort(logits)[-3:].tolist())
    assert set(samples.tolist()) == best  # never outside, and each of the three does occur
    # the survivors keep their relative probabilities: softmax over the three at temperature 2
    z = np.exp(logits[sorted(best)] / 2.0)
    np.testing.assert_allclose(frequencies(samples, 12)[sorted(best)], z / z.sum(), atol=0.03)


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    probs = np.array([0.15, 0.5, 0.05, 0.3])  # deliberately not sorted
    logits = np.log(probs)
    for top_p, kept in ((0.4, [1]), (0.7, [1, 3]), (0.85, [0, 1, 3]), (1.0, [0, 1, 2, 3])):
        samples = draw(logits, temperature=1.0, top_p=top_p)
        assert sorted(set(samples.tolist())) == kept, top_p
        np.testing.assert_allclose(frequencies(samples, 4)[kept], probs[kept] / probs[kept].sum(), atol=0.03)


def test_top_k_and_top_p_are_per_row():
    a, b = np.log([0.5, 0.3, 0.15, 0.05]), np.log([0.05, 0.15, 0.3, 0.5])
    logits_bv = jnp.asarray(np.stack([a, b] * (N_SAMPLES // 2)), jnp.float32)
    for top_k, top_p in ((2, 1.0), (0, 0.7)):
        samples = np.asarray(sample_logits(logits_bv, jax.random.key(4), 1.0, top_k, top_p))
        assert set(samples[0::2].tolist()) == {0, 1}
        assert set(samples[1::2].tolist()) == {2, 3}


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sampling_frequencies_match_softmax(temperature):
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    freq = frequencies(draw(logits, temperature=temperature, seed=9), len(logits))
    z = np.exp(logits / temperature)
    np.testing.assert_allclose(freq, z / z.sum(), atol=0.025)


def test_sampling_config_validation():
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-0.1)
    for top_p in (0.0, -0.5, 1.01):
        with pytest.raises(ValueError, match="top_p"):
            SamplingConfig(top_p=top_p)
    with pytest.raises(ValueError, match="top_k"):
        SamplingConfig(top_k=-1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingConfig(max_new_tokens=0)
    SamplingConfig(temperature=0.0, top_p=1.0, top_k=0)  # the boundaries are allowed


def test_per_row_settings_filter_like_the_static_ones():
    """The sampler's per-row form (the server's slots) keeps the same tokens as its static form, row by row, and a
    row at temperature 0 is greedy."""
    from qkv.inference.decode import filter_logits

    logits = jnp.asarray(np.random.default_rng(3).standard_normal((4, 11)), jnp.float32)
    settings = [(0, 1.0), (3, 1.0), (0, 0.6), (4, 0.5)]
    per_row = filter_logits(logits, jnp.asarray([k for k, _ in settings]), jnp.asarray([p for _, p in settings]))
    for row, (k, p) in enumerate(settings):
        static = filter_logits(logits[row:row + 1], k, p)
        np.testing.assert_array_equal(np.asarray(per_row[row]), np.asarray(static[0]))
    keys = jax.random.split(jax.random.key(0), 4)
    temperature = jnp.asarray([0.0, 1.0, 0.0, 2.0])
    got = np.asarray(sample_logits(logits, keys, temperature, jnp.asarray([0, 1, 0, 1]), jnp.ones(4)))
    np.testing.assert_array_equal(got, np.argmax(np.asarray(logits), -1))  # greedy rows and top-1 rows
