"""Autoregressive decoding for both generating shapes: sampling, greedy and beam search with a KV cache.

Decoder-only (``Decoder``): prompts of different lengths are left-padded to one length; padding gets
segment 0 so real tokens never attend to it, and positions count real tokens only. The prompt is
prefilled into the cache, then each decode step is one jitted call with a donated cache, so tokens
can be streamed to the terminal as they are produced.

Encoder-decoder (``Seq2SeqDecoder``): sources are right-padded (segment 0 on padding, which no
target token sees); the encoder runs once per batch and its output is projected once into every
decoder layer's cross-attention keys and values (``EncoderDecoder.memory_kv``), which each step
reuses, while the decoder's own keys and values grow in the cache. Greedy decoding and sampling run
as one compiled ``lax.scan``.

Beam search (``beam_size`` > 1, inference/beam.py) is one compiled function for both shapes: a
shape-specific start (``_BEAM_STARTS``) fills ``batch × beam`` cache rows and names the first token
to feed; the search itself is model-agnostic.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .beam import beam_search
from qkv.model.config import ModelConfig
from qkv.model.transformer import init_cache, reorder_cache
from qkv.errors import UserError


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 means greedy; top_k 0 and top_p 1.0 disable those filters."""

    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 128
    seed: int = 0
    vocab_limit: int = 0  # > 0: only ids below it are ever produced (a tokenizer smaller than the model's vocab)

    def __post_init__(self) -> None:
        for key, ok, need in (
            ("temperature", _finite(self.temperature) and self.temperature >= 0, "a finite number >= 0 (0 means greedy)"),
            ("top_k", _int_in(self.top_k, 0, MAX_INT), "an integer >= 0 (0 disables top-k)"),
            ("top_p", _finite(self.top_p) and 0.0 < self.top_p <= 1.0, "in (0, 1] (1 disables top-p)"),
            ("max_new_tokens", _int_in(self.max_new_tokens, 1, MAX_INT), "an integer >= 1"),
            ("seed", _int_in(self.seed, 0, 2**32 - 1), "an integer in [0, 4294967295]"),
            ("vocab_limit", _int_in(self.vocab_limit, 0, MAX_INT), "an integer >= 0 (0: the whole vocabulary)"),
        ):
            if not ok:
                raise UserError(f"{key}={getattr(self, key)} must be {need}: pass --{key.replace('_', '-')} "
                                "(or the argument of that name) in that range")


MAX_INT = 2**31 - 1
MAX_BEAM = 1024


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int_in(x: object, lo: int, hi: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi


def check_beam(beam_size: int, length_penalty: float) -> None:
    """Beam search settings: a width in [1, 1024] and a finite GNMT length penalty."""
    if not _int_in(beam_size, 1, MAX_BEAM):
        raise UserError(f"beam_size={beam_size} must be an integer in [1, {MAX_BEAM}]: pass --beam-size 1 (no beam "
                        "search) or e.g. 4")
    if not _finite(length_penalty):
        raise UserError(f"length_penalty={length_penalty} must be a finite number: pass --length-penalty e.g. 0.6")


def limit_vocab(logits_bv: jax.Array, vocab_limit: int) -> jax.Array:
    """Logits with every id >= ``vocab_limit`` made impossible (0: unchanged). A model whose vocabulary is larger
    than its tokenizer's must never produce the ids no piece has."""
    if not 0 < vocab_limit < logits_bv.shape[-1]:
        return logits_bv
    ids_v = jnp.arange(logits_bv.shape[-1])
    return jnp.where(ids_v < vocab_limit, logits_bv, jnp.finfo(logits_bv.dtype).min)


def _static(*settings: object) -> bool:
    return all(isinstance(x, (int, float)) for x in settings)


def filter_logits(logits_bv: jax.Array, top_k: int | jax.Array, top_p: float | jax.Array) -> jax.Array:
    """Temperature-scaled float32 logits [B, V] with the tokens that top-k and top-p drop set to the dtype's
    minimum (the sampler's filter; ``qkv explain`` marks the survivors with it). ``top_k`` and ``top_p`` are
    numbers (one setting for the batch, compiled in) or arrays [B] (one per row, as the server's slots have)."""
    neg_inf = jnp.finfo(logits_bv.dtype).min
    if _static(top_k, top_p):
        if top_k > 0:
            kth_best = jax.lax.top_k(logits_bv, min(top_k, logits_bv.shape[-1]))[0][:, -1:]
            logits_bv = jnp.where(logits_bv < kth_best, neg_inf, logits_bv)
        if top_p < 1.0:
            logits_bv = _top_p(logits_bv, jnp.sort(logits_bv, axis=-1)[:, ::-1], top_p)
        return logits_bv
    vocab = logits_bv.shape[-1]
    top_k_b1 = jnp.asarray(top_k, jnp.int32).reshape(-1, 1)
    top_p_b1 = jnp.asarray(top_p, jnp.float32).reshape(-1, 1)
    k_b1 = jnp.where(top_k_b1 > 0, jnp.minimum(top_k_b1, vocab), vocab)
    sorted_bv = jnp.sort(logits_bv, axis=-1)[:, ::-1]
    kth_best_b1 = jnp.take_along_axis(sorted_bv, k_b1 - 1, axis=-1)
    logits_bv = jnp.where(logits_bv < kth_best_b1, neg_inf, logits_bv)
    sorted_bv = jnp.where(jnp.arange(vocab) < k_b1, sorted_bv, neg_inf)
    return jnp.where(top_p_b1 < 1.0, _top_p(logits_bv, sorted_bv, top_p_b1), logits_bv)


def _top_p(logits_bv, sorted_bv, top_p):
    """Keep the smallest prefix of the descending ``sorted_bv`` whose mass reaches top_p (the best token always)."""
    probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
    mass_before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
    n_keep_b = jnp.sum(mass_before_bv < top_p, axis=-1)
    threshold_b1 = jnp.take_along_axis(sorted_bv, n_keep_b[:, None] - 1, axis=-1)
    return jnp.where(logits_bv < threshold_b1, jnp.finfo(logits_bv.dtype).min, logits_bv)


def greedy_tokens(logits_bv: jax.Array) -> jax.Array:
    """``jnp.argmax(logits_bv, axis=-1)`` as int32 (the first of equal maxima; a NaN counts as the maximum), written
    as two plain reductions: XLA:CPU runs argmax's (value, index) reduction element by element, several times
    slower than a max and a min over a whole vocabulary."""
    best_b1 = jnp.max(logits_bv, axis=-1, keepdims=True)
    ids_v = jnp.arange(logits_bv.shape[-1], dtype=jnp.int32)
    hit_bv = (logits_bv == best_b1) | jnp.isnan(logits_bv)
    return jnp.min(jnp.where(hit_bv, ids_v, logits_bv.shape[-1]), axis=-1).astype(jnp.int32)


def sample_logits(logits_bv: jax.Array, key: jax.Array, temperature: float | jax.Array, top_k: int | jax.Array,
                  top_p: float | jax.Array, vocab_limit: int = 0) -> jax.Array:
    """Next token ids [B] from float32 logits [B, V]. Settings are numbers (static: one for the batch, ``key`` one
    key) or arrays [B] (one per row, ``key`` one key per row; temperature 0 in a row: that row is greedy)."""
    logits_bv = limit_vocab(logits_bv, vocab_limit)
    if _static(temperature, top_k, top_p):
        if temperature == 0.0:
            return greedy_tokens(logits_bv)
        logits_bv = filter_logits(logits_bv / temperature, top_k, top_p)
        return jax.random.categorical(key, logits_bv, axis=-1).astype(jnp.int32)
    temperature_b1 = jnp.asarray(temperature, jnp.float32).reshape(-1, 1)
    greedy_b = greedy_tokens(logits_bv)

    def sampled(logits_bv):  # skipped (lax.cond) when every row is greedy, the filters when no row filters
        scaled_bv = logits_bv / jnp.where(temperature_b1 > 0, temperature_b1, 1.0)
        filters = jnp.any(jnp.asarray(top_k) > 0) | jnp.any(jnp.asarray(top_p) < 1.0)
        scaled_bv = jax.lax.cond(filters, lambda x: filter_logits(x, top_k, top_p), lambda x: x, scaled_bv)
        sampled_b = jax.vmap(lambda k, row: jax.random.categorical(k, row))(key, scaled_bv)
        return jnp.where(temperature_b1[:, 0] > 0, sampled_b, greedy_b).astype(jnp.int32)

    return jax.lax.cond(jnp.any(temperature_b1 > 0), sampled, lambda _: greedy_b, logits_bv)


def token_logprobs(logits_bv: jax.Array, token_b: jax.Array, top_n: int) -> tuple[jax.Array, ...]:
    """(log p(token) [B], the ``top_n`` likeliest ids [B, N] and their log-probabilities [B, N]) at temperature 1."""
    logp_bv = jax.nn.log_softmax(logits_bv.astype(jnp.float32), axis=-1)
    chosen_b = jnp.take_along_axis(logp_bv, token_b[..., None], axis=-1)[..., 0]
    top_lp, top_ids = jax.lax.top_k(logp_bv, max(top_n, 1))
    return chosen_b, top_ids.astype(jnp.int32), top_lp


def bucket(n: int, least: int = 8) -> int:
    """``n`` rounded up to the next of least·2^k and 1.5·least·2^k (8, 12, 16, 24, 32, 48, ...): shapes that
    share a compiled program, at most 1.5x the work of the exact shape."""
    size = least
    while size < n:
        size = size * 3 // 2 if (size & (size - 1)) == 0 else size * 4 // 3
    return size


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, length: int | None = None,
             rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [B, P], segments [B, P]) with each prompt right-aligned; segment 1 = real token. ``length`` /
    ``rows``: at least that many columns / rows (rows past the prompts are all padding)."""
    length = max(length or 0, max(len(p) for p in prompts))
    tokens = np.full((max(rows or 0, len(prompts)), length), pad_id, np.int32)
    segments = np.zeros(tokens.shape, np.int32)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            tokens[row, length - len(prompt):] = prompt
            segments[row, length - len(prompt):] = 1
    return tokens, segments


# One EOS id, several (generation_config.json's eos_token_id list: Llama 3, Qwen), or None (never stop early)
Eos = int | Sequence[int] | None


def eos_ids(eos: Eos) -> tuple[int, ...]:
    """The ids that end a row, as a tuple (empty: none)."""
    if eos is None:
        return ()
    if isinstance(eos, (int, np.integer)):
        return (int(eos),)
    return tuple(int(e) for e in eos)


def trim_at_eos(row: Sequence[int], eos_id: Eos) -> list[int]:
    """The tokens of ``row`` before its first EOS (any of ``eos_id``'s ids)."""
    row, stops = [int(t) for t in row], eos_ids(eos_id)
    end = next((i for i, t in enumerate(row) if t in stops), len(row))
    return row[:end]


# jax.random.fold_in dispatched op by op costs ~10x a jitted call (~0.25 against ~0.025 ms on CPU), once per token
fold_in = jax.jit(jax.random.fold_in)


class Sampler(NamedTuple):
    """What a compiled prefill/step computes besides the next token (static: one program per value).

    temperature/top_k/top_p: numbers compiled in for the whole batch (``qkv generate``), or None: per-row arrays
    passed at call time (``rows``: the server's slots, each request its own settings and seed). top_n > 0: also
    the chosen token's log-probability and the ``top_n`` likeliest tokens; prompt_logprobs: the same for every
    prompt token (``echo`` with ``logprobs``, lm-eval's log-likelihoods)."""

    temperature: float | None = 0.0
    top_k: int | None = 0
    top_p: float | None = 1.0
    vocab_limit: int = 0
    top_n: int = 0
    prompt_logprobs: bool = False


def _next(how: Sampler, logits_bv, key, rows, out):
    """Sample the next token of every row into ``out`` (with its log-probabilities when asked)."""
    if how.temperature is None:  # per-row settings; each row's key from its seed and its own token count
        key = jax.vmap(lambda seed, n: jax.random.fold_in(jax.random.key(seed), n))(rows["seed"], rows["count"])
        settings = (rows["temperature"], rows["top_k"], rows["top_p"])
    else:
        settings = (how.temperature, how.top_k, how.top_p)
    out["token"] = sample_logits(logits_bv, key, *settings, how.vocab_limit)
    if how.top_n:
        out["logprob"], out["top_ids"], out["top_logprobs"] = token_logprobs(logits_bv, out["token"], how.top_n)
    return out


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(5,))
def prefill(graphdef: nnx.GraphDef, how: Sampler, params, tokens_bp, segments_bp, cache, key=None, rows=None):
    """Left-padded prompts [B, P] into an empty per-row cache: ({"token" [B], "position" [B], ...}, cache).
    Compiled once per (graph, sampler, shapes): callers round P and the cache length up to a ``bucket``."""
    positions_bp = jnp.maximum(jnp.cumsum(segments_bp, axis=1) - 1, 0)
    logits_bpv, cache = nnx.merge(graphdef, params)(tokens_bp, positions_bp, segments_bp, cache=cache)
    out = _next(how, logits_bpv[:, -1], key, rows, {"position": positions_bp[:, -1] + 1})
    if how.prompt_logprobs:  # log p(prompt token t+1 | tokens up to t)
        out["prompt"] = token_logprobs(logits_bpv[:, :-1], tokens_bp[:, 1:], how.top_n)
    return out, cache


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(5,))
def step(graphdef: nnx.GraphDef, how: Sampler, params, token_b, position_b, cache, key=None, rows=None,
         active_b=None):
    """One decoding step of every row: feed ``token_b`` at ``position_b``; rows not ``active_b`` (free slots)
    write padding (segment 0) that no real token sees. Compiled once per (graph, sampler, batch, cache length)."""
    segment_b1 = (jnp.ones_like(token_b) if active_b is None else active_b.astype(jnp.int32))[:, None]
    logits, cache = nnx.merge(graphdef, params)(token_b[:, None], position_b[:, None], segment_b1, cache=cache)
    return _next(how, logits[:, -1], key, rows, {"position": position_b + 1}), cache


class Decoder:
    """Prefill and decode steps for one model graph and one sampling setting (compiled once per shape bucket and
    shared by every Decoder of the same graph and setting); with ``beam_size`` > 1, ``generate`` runs beam
    search instead of sampling."""

    def __init__(self, cfg: ModelConfig, graphdef: nnx.GraphDef, sampling: SamplingConfig, beam_size: int = 1,
                 length_penalty: float = 0.6):
        check_beam(beam_size, length_penalty)
        self.cfg, self.graphdef, self.sampling = cfg, graphdef, sampling
        self.beam_size, self.length_penalty = beam_size, length_penalty
        s = sampling
        self.how = Sampler(float(s.temperature), s.top_k, float(s.top_p), s.vocab_limit)

    def stream(self, params: Any, prompts: Sequence[Sequence[int]], pad_id: int,
               eos_id: Eos) -> Iterator[np.ndarray]:
        """Yields the next token of every row, [B] int32, until all rows hit an EOS id or the budget ends.

        Rows that already finished keep yielding ``pad_id``.
        """
        if self.beam_size > 1:
            raise UserError("beam search returns whole sequences: use generate, or beam_size=1 to stream")
        tokens, segments, budget = self._padded(prompts, pad_id, bucketed=True)
        cache = init_cache(self.cfg, tokens.shape[0], bucket(tokens.shape[1] + budget), per_row=True)
        key = jax.random.key(self.sampling.seed)
        n = len(prompts)
        done, stops = np.zeros(n, bool), np.asarray(eos_ids(eos_id), np.int64)
        out, cache = prefill(self.graphdef, self.how, params, tokens, segments, cache, fold_in(key, 0))
        for i in range(budget):
            # The next step is queued before this token is read back, so the host's work per token (the read, the
            # EOS check, the caller's) overlaps the device's; after the last row's EOS it is computed for nothing.
            if i < budget - 1:
                ahead = step(self.graphdef, self.how, params, out["token"], out["position"], cache, fold_in(key, i + 1))
            token_np = np.asarray(out["token"])[:n]
            emitted = np.where(done, pad_id, token_np)
            done |= np.isin(token_np, stops)
            yield emitted
            if done.all() or i == budget - 1:
                return
            out, cache = ahead

    def _padded(self, prompts: Sequence[Sequence[int]], pad_id: int,
                bucketed: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
        """Left-padded (tokens, segments), to a ``bucket`` of columns if ``bucketed``, and how many new tokens
        fit after the longest prompt."""
        if any(len(p) == 0 for p in prompts):
            raise UserError("empty prompt: give at least one token of text (or a BOS id)")
        longest = max(len(p) for p in prompts)
        budget = min(self.sampling.max_new_tokens, self.cfg.max_seq_len - longest)
        if budget < 1:
            raise UserError(f"prompt of {longest} tokens leaves no room in the model's context of "
                            f"{self.cfg.max_seq_len}: shorten the prompt")
        return (*left_pad(prompts, pad_id, bucket(longest) if bucketed else None), budget)

    def generate(self, params: Any, prompts: Sequence[Sequence[int]], pad_id: int,
                 eos_id: Eos) -> list[list[int]]:
        """New tokens per prompt (without the prompt), stopping after an EOS id (excluded); the best beam's
        when ``beam_size`` > 1 (hypotheses finish at the first EOS id; the result is cut at any)."""
        stops = eos_ids(eos_id)
        if self.beam_size > 1:
            if not stops:
                raise UserError("beam search needs an EOS id to finish hypotheses: the tokenizer has none")
            tokens, segments, budget = self._padded(prompts, pad_id)
            best = beam_generate(self.graphdef, self.cfg, params, (tokens, segments), stops[0], budget,
                                 self.beam_size, self.length_penalty, self.sampling.vocab_limit)
            return [trim_at_eos(row, eos_id) for row in np.asarray(best)]
        rows: list[list[int]] = [[] for _ in prompts]
        finished = [False] * len(prompts)
        for tokens in self.stream(params, prompts, pad_id, eos_id):
            for row, tok in enumerate(tokens.tolist()):
                if finished[row]:
                    continue
                if tok in stops:
                    finished[row] = True
                else:
                    rows[row].append(tok)
        return rows


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
    """Compiled encode + decode for one encoder-decoder graph; greedy/sampling (``sampling``) or beam search."""

    def __init__(self, cfg: ModelConfig, graphdef: nnx.GraphDef, sampling: SamplingConfig, beam_size: int = 1,
                 length_penalty: float = 0.6):
        if cfg.kind != "encoder_decoder":
            raise UserError(f"model.kind={cfg.kind!r} has no decoder reading a source: translation needs an "
                            "encoder_decoder checkpoint")
        check_beam(beam_size, length_penalty)
        self.cfg, self.graphdef, self.sampling = cfg, graphdef, sampling
        self.beam_size, self.length_penalty = beam_size, length_penalty

    def generate(self, params: Any, sources: Sequence[Sequence[int]], bos_id: int, eos_id: int,
                 pad_id: int = 0) -> list[list[int]]:
        """Target ids per source (without bos, cut before the first eos)."""
        if any(len(s) == 0 for s in sources):
            raise UserError("empty source: give at least one token to translate")
        longest = max(len(s) for s in sources)
        if longest > self.cfg.max_seq_len:
            raise UserError(f"a source of {longest} tokens exceeds the model's context of {self.cfg.max_seq_len}: "
                            "shorten it")
        steps = min(self.sampling.max_new_tokens, self.cfg.max_seq_len)
        src, segments = right_pad(sources, pad_id)
        bos_b = np.full((src.shape[0],), bos_id, np.int32)
        if self.beam_size > 1:
            tokens = beam_generate(self.graphdef, self.cfg, params, (src, segments, bos_b), eos_id, steps,
                                   self.beam_size, self.length_penalty, self.sampling.vocab_limit)
        else:
            s = self.sampling
            tokens = _sample_seq2seq(self.graphdef, self.cfg, params, src, segments, jax.random.key(s.seed), bos_id,
                                     steps, s.temperature, s.top_k, s.top_p, s.vocab_limit)
        return [trim_at_eos(row, eos_id) for row in np.asarray(tokens)]


def _encode(model, src_bs, segments_bs, rows: int):
    """(per-layer memory keys/values, source segments), each source repeated ``rows`` times (beams)."""
    memory_kv = model.memory_kv(model.encode(src_bs, None, segments_bs))
    repeat = lambda a, axis: jnp.repeat(a, rows, axis=axis)  # noqa: E731
    return (repeat(memory_kv[0], 1), repeat(memory_kv[1], 1)), repeat(segments_bs, 0)


@functools.partial(jax.jit, static_argnums=(0, 1, 7, 8, 9, 10, 11))
def _sample_seq2seq(graphdef, cfg, params, src_bs, segments_bs, key, bos_id, steps, temperature, top_k, top_p,
                    vocab_limit=0):
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


def _decoder_beam_start(model, cfg, inputs, rows, steps, vocab_limit=0):
    """Left-padded prompts: every prompt but its last token is prefilled into ``rows`` cache rows each;
    the search feeds that last token first, then its own picks."""
    tokens_bp, segments_bp = inputs
    b, p = tokens_bp.shape
    tokens_np, segments_np = jnp.repeat(tokens_bp, rows, axis=0), jnp.repeat(segments_bp, rows, axis=0)
    cache = init_cache(cfg, b * rows, p + steps)
    if p > 1:
        positions_np = jnp.maximum(jnp.cumsum(segments_np[:, :-1], axis=1) - 1, 0)
        _, cache = model(tokens_np[:, :-1], positions_np, segments_np[:, :-1], cache=cache)
    last_position_n = jnp.sum(segments_np, axis=1) - 1  # equal across a prompt's beams, so reordering keeps it

    def logits_fn(token_n, cache):
        position_n = last_position_n + cache["index"] - (p - 1)
        logits, cache = model(token_n[:, None], position_n[:, None], jnp.ones_like(token_n)[:, None], cache=cache)
        return limit_vocab(logits[:, -1], vocab_limit), cache

    return logits_fn, cache, tokens_bp[:, -1]


def _seq2seq_beam_start(model, cfg, inputs, rows, steps, vocab_limit=0):
    """Right-padded sources: encoded once, their cross-attention memory repeated over ``rows`` beams; the
    search feeds bos first."""
    src_bs, segments_bs, bos_b = inputs
    memory = _encode(model, src_bs, segments_bs, rows)

    def logits_fn(token_n, cache):
        logits, cache = model(token_n[:, None], cache=cache, memory=memory)
        return limit_vocab(logits[:, -1], vocab_limit), cache

    return logits_fn, init_cache(cfg, src_bs.shape[0] * rows, steps), bos_b


_BEAM_STARTS = {"decoder": _decoder_beam_start, "encoder_decoder": _seq2seq_beam_start}


@functools.partial(jax.jit, static_argnums=(0, 1, 4, 5, 6, 7, 8))
def beam_generate(graphdef, cfg, params, inputs, eos_id, steps, beam_size, length_penalty, vocab_limit=0):
    """The best beam's new tokens [B, steps]: ``inputs`` are (tokens, segments) of left-padded prompts for a
    decoder, (source tokens, source segments, bos ids) for an encoder-decoder."""
    model = nnx.merge(graphdef, params)
    logits_fn, cache, first_n = _BEAM_STARTS[cfg.kind](model, cfg, inputs, beam_size, steps, vocab_limit)
    tokens_bkt, _ = beam_search(logits_fn, cache, first_n, beam_size=beam_size, max_new_tokens=steps,
                                eos_id=eos_id, length_penalty=length_penalty, reorder_cache=reorder_cache)
    return tokens_bkt[:, 0]
