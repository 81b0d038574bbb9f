"""Encoder-decoder generation: encode the source once, then decode token by token.

The encoder runs once per batch; its output is projected once into every decoder layer's
cross-attention keys and values (``EncoderDecoder.memory_kv``), which each step reuses, while the
decoder's own self-attention keys and values grow in a KV cache as for the decoder-only model.
Greedy decoding and sampling run as one compiled ``lax.scan`` over the steps; beam search
(inference/beam.py) runs the same step function over ``batch × beam`` rows.

Sources of different lengths are right-padded (segment 0 on padding, which no target token sees).
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .beam import beam_search
from qkv.model.config import ModelConfig
from .decode import SamplingConfig, check_beam, limit_vocab, sample_logits, trim_at_eos
from qkv.model.transformer import init_cache, reorder_cache


def right_pad(rows: Sequence[Sequence[int]], pad_id: int, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [B, S], segments [B, S]) with each row left-aligned; segment 1 = real token."""
    length = length or max(len(r) for r in rows)
    tokens = np.full((len(rows), length), pad_id, np.int32)
    segments = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = row
        segments[i, :len(row)] = 1
    return tokens, segments


class Seq2SeqDecoder:
    """Compiled encode + decode for one model graph; greedy/sampling (``sampling``) or beam search."""

    def __init__(self, cfg: ModelConfig, graphdef: nnx.GraphDef, sampling: SamplingConfig, beam_size: int = 1,
                 length_penalty: float = 0.6):
        if cfg.kind != "encoder_decoder":
            raise ValueError(f"model.kind={cfg.kind!r} has no decoder reading a source: translation needs an "
                             "encoder_decoder checkpoint")
        check_beam(beam_size, length_penalty)
        self.cfg, self.graphdef, self.sampling = cfg, graphdef, sampling
        self.beam_size, self.length_penalty = beam_size, length_penalty

    def generate(self, params: Any, sources: Sequence[Sequence[int]], bos_id: int, eos_id: int,
                 pad_id: int = 0) -> list[list[int]]:
        """Target ids per source (without bos, cut before the first eos)."""
        if any(len(s) == 0 for s in sources):
            raise ValueError("empty source: give at least one token to translate")
        longest = max(len(s) for s in sources)
        if longest > self.cfg.max_seq_len:
            raise ValueError(f"a source of {longest} tokens exceeds the model's context of {self.cfg.max_seq_len}: "
                             "shorten it")
        steps = min(self.sampling.max_new_tokens, self.cfg.max_seq_len)
        src, segments = right_pad(sources, pad_id)
        if self.beam_size > 1:
            tokens = _beam(self.graphdef, self.cfg, params, src, segments, bos_id, eos_id, steps, self.beam_size,
                           self.length_penalty, self.sampling.vocab_limit)[:, 0]
        else:
            s = self.sampling
            tokens = _sample(self.graphdef, self.cfg, params, src, segments, jax.random.key(s.seed), bos_id, steps,
                             s.temperature, s.top_k, s.top_p, s.vocab_limit)
        return [trim_at_eos(row, eos_id) for row in np.asarray(tokens)]


def _encode(model, src_bs, segments_bs, rows: int):
    """(per-layer memory keys/values, source segments), each source repeated ``rows`` times (beams)."""
    memory_kv = model.memory_kv(model.encode(src_bs, None, segments_bs))
    repeat = lambda a, axis: jnp.repeat(a, rows, axis=axis)  # noqa: E731
    return (repeat(memory_kv[0], 1), repeat(memory_kv[1], 1)), repeat(segments_bs, 0)


@functools.partial(jax.jit, static_argnums=(0, 1, 7, 8, 9, 10, 11))
def _sample(graphdef, cfg, params, src_bs, segments_bs, key, bos_id, steps, temperature, top_k, top_p, vocab_limit=0):
    model = nnx.merge(graphdef, params)
    memory = _encode(model, src_bs, segments_bs, 1)
    b = src_bs.shape[0]

    def step(carry, i):
        token_b, cache = carry
        logits, cache = model(token_b[:, None], cache=cache, memory=memory)
        token_b = sample_logits(logits[:, -1], jax.random.fold_in(key, i), temperature, top_k, top_p, vocab_limit)
        return (token_b, cache), token_b

    start = (jnp.full((b,), bos_id, jnp.int32), init_cache(cfg, b, steps))
    _, tokens_tb = jax.lax.scan(step, start, jnp.arange(steps))
    return tokens_tb.T


@functools.partial(jax.jit, static_argnums=(0, 1, 5, 6, 7, 8, 9, 10))
def _beam(graphdef, cfg, params, src_bs, segments_bs, bos_id, eos_id, steps, beam_size, length_penalty, vocab_limit=0):
    model = nnx.merge(graphdef, params)
    memory = _encode(model, src_bs, segments_bs, beam_size)
    b = src_bs.shape[0]

    def logits_fn(tokens_n, cache):
        logits, cache = model(tokens_n[:, None], cache=cache, memory=memory)
        return limit_vocab(logits[:, -1], vocab_limit), cache

    tokens, _ = beam_search(logits_fn, init_cache(cfg, b * beam_size, steps), jnp.full((b,), bos_id, jnp.int32),
                            beam_size=beam_size, max_new_tokens=steps, eos_id=eos_id, length_penalty=length_penalty,
                            reorder_cache=reorder_cache)
    return tokens
