"""Batched beam search (as in T5X/Flax and Google NMT, Wu et al. 2016), jit-compatible.

Each batch row keeps K live beams (hypotheses still growing) and up to K finished ones (ended by
EOS). One step: the model scores the next token of every live beam; a candidate's score is its
beam's summed log-probability plus log p(token), in float32. Of the K·V candidates of a row the
best 2K are kept (at most K of them end in EOS, so at least K do not); the best K non-EOS
candidates are the new live beams, and EOS candidates among the best K join the finished set,
ranked by the length-normalised score

    logprob / lp(len),   lp(len) = ((5 + len) / 6) ** alpha   (len counts generated tokens, EOS included)

The loop stops when every row has K finished beams that no live beam can still beat (log-probs
only fall, so a live beam's best reachable score is its log-prob over the largest lp ahead), or
after ``max_new_tokens`` steps. Finishing only from the best K candidates (fairseq's rule; T5X
takes EOS from all 2K) makes beam size 1 exactly greedy decoding when alpha = 0; with alpha > 0
the penalty may rightly prefer a longer hypothesis. At step 0 only beam 0 of each row is live (the
others start at -inf) so the K beams differ. Rows with fewer than K finished beams at the end are
filled with their best live beams, scored with the same penalty at len = max_new_tokens; the K are
returned best first.

Tokens from a beam's EOS on are ``eos_id`` (padding is EOS, not 0). Live beams carry the model's
cache; when a beam's parent changes, its cache rows are gathered from the parent's
(``reorder_cache``). Under jit, ``logits_fn``, ``beam_size``, ``max_new_tokens`` and ``eos_id``
must be static; bind them first::

    search = jax.jit(functools.partial(beam_search, logits_fn, beam_size=4, max_new_tokens=64, eos_id=1))
    tokens_bkt, scores_bk = search(cache, first_tokens_b)

Shape suffixes: b batch, k beams, c candidates (2k), n = b·k model rows, v vocabulary,
t generated tokens.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

LogitsFn = Callable[[jax.Array, Any], tuple[jax.Array, Any]]
ReorderFn = Callable[[Any, jax.Array], Any]
NEG_INF = -jnp.inf


def length_penalty_factor(length: jax.Array | int, alpha: float) -> jax.Array:
    """GNMT length penalty lp(len) = ((5 + len) / 6) ** alpha (1 when alpha = 0)."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def gather_rows(cache: Any, parent_n: jax.Array) -> Any:
    """Default ``reorder_cache``: row n of every leaf with ndim >= 1 becomes row parent_n[n] (axis 0)."""
    return jax.tree.map(lambda x: x[parent_n] if jnp.ndim(x) >= 1 else x, cache)


def _take_bk(x_bk: jax.Array, idx_bj: jax.Array) -> jax.Array:
    """x[b, idx[b, j], ...] for every b, j (gathers along the beam axis, trailing axes kept)."""
    idx = idx_bj.reshape(idx_bj.shape + (1,) * (x_bk.ndim - 2))
    return jnp.take_along_axis(x_bk, idx, axis=1)


def beam_search(
    logits_fn: LogitsFn,
    cache: Any,
    first_tokens_b: jax.Array,
    *,
    beam_size: int,
    max_new_tokens: int,
    eos_id: int,
    length_penalty: float = 0.6,
    reorder_cache: ReorderFn | None = None,
    early_stop: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Returns (tokens [B, beam_size, max_new_tokens] int32, scores [B, beam_size] float32), best first.

    logits_fn(tokens_n [N] int32, cache) -> (logits [N, V], new cache), N = B * beam_size, rows
    batch-major (row n = b * beam_size + j). It is called once per step with the previously chosen
    token of each beam (first with first_tokens_b repeated per beam: the caller passes ``cache``
    already expanded to N rows). reorder_cache(cache, parent_n [N] int32) -> cache gathers each
    row's cache from its parent row; default ``gather_rows`` (axis 0 of every leaf with ndim >= 1),
    callers with other layouts pass their own. Scores are log-probabilities divided by
    lp(len) = ((5 + len) / 6) ** length_penalty. ``early_stop=False`` always runs max_new_tokens
    steps (same result: stopping happens only once no live beam can change it). ``length_penalty``
    must be a Python float (it is baked into the trace). Needs V >= 2. A score of -inf marks a
    slot with no possible sequence (fewer than beam_size continuations have nonzero probability).
    """
    k, steps = beam_size, max_new_tokens
    reorder = gather_rows if reorder_cache is None else reorder_cache
    first_tokens_b = jnp.asarray(first_tokens_b, jnp.int32)
    b = first_tokens_b.shape[0]
    alpha = float(length_penalty)
    max_lp = jnp.maximum(length_penalty_factor(1, alpha), length_penalty_factor(steps, alpha))

    state = dict(
        step=jnp.zeros((), jnp.int32),
        tokens_n=jnp.repeat(first_tokens_b, k),
        cache=cache,
        live_logprob_bk=jnp.where(jnp.arange(k) == 0, 0.0, NEG_INF)[None].repeat(b, 0).astype(jnp.float32),
        live_seq_bkt=jnp.full((b, k, steps), eos_id, jnp.int32),
        done_score_bk=jnp.full((b, k), NEG_INF, jnp.float32),
        done_seq_bkt=jnp.full((b, k, steps), eos_id, jnp.int32),
    )

    def n_done_b1(s: dict) -> jax.Array:
        return jnp.sum(s["done_score_bk"] > NEG_INF, axis=1, keepdims=True)

    def not_done(s: dict) -> jax.Array:
        if not early_stop:
            return s["step"] < steps
        # a live beam's best reachable score: its log-prob (which can only fall) over the largest lp ahead
        best_live_b = s["live_logprob_bk"][:, 0] / max_lp
        worst_done_b = s["done_score_bk"][:, -1]
        settled_b = worst_done_b > best_live_b  # -inf when fewer than K have finished: not settled
        return (s["step"] < steps) & ~jnp.all(settled_b)

    def step_fn(s: dict) -> dict:
        t = s["step"]
        logits_nv, new_cache = logits_fn(s["tokens_n"], s["cache"])
        v = logits_nv.shape[-1]
        logp_bkv = jax.nn.log_softmax(logits_nv.astype(jnp.float32), axis=-1).reshape(b, k, v)
        cand_bkv = s["live_logprob_bk"][:, :, None] + logp_bkv
        cand_logprob_bc, flat_bc = jax.lax.top_k(cand_bkv.reshape(b, k * v), 2 * k)
        parent_bc, token_bc = flat_bc // v, (flat_bc % v).astype(jnp.int32)
        cand_seq_bct = _take_bk(s["live_seq_bkt"], parent_bc)
        cand_seq_bct = jax.lax.dynamic_update_slice_in_dim(cand_seq_bct, token_bc[:, :, None], t, axis=2)
        is_eos_bc = token_bc == eos_id

        # live: the best K candidates that did not emit EOS
        live_logprob_bk, pick_bk = jax.lax.top_k(jnp.where(is_eos_bc, NEG_INF, cand_logprob_bc), k)
        live_seq_bkt = _take_bk(cand_seq_bct, pick_bk)
        parent_bk = _take_bk(parent_bc, pick_bk)
        parent_n = (jnp.arange(b)[:, None] * k + parent_bk).reshape(b * k).astype(jnp.int32)

        # finished: merge the EOS candidates (length-penalised at len = t + 1) into the K best so far
        finishes_bc = is_eos_bc & (jnp.arange(2 * k) < k)[None]  # only the best K candidates may finish
        new_done_bc = jnp.where(finishes_bc, cand_logprob_bc / length_penalty_factor(t + 1, alpha), NEG_INF)
        all_score_bj = jnp.concatenate([s["done_score_bk"], new_done_bc], axis=1)
        all_seq_bjt = jnp.concatenate([s["done_seq_bkt"], cand_seq_bct], axis=1)
        done_score_bk, keep_bk = jax.lax.top_k(all_score_bj, k)
        return dict(
            step=t + 1,
            tokens_n=jax.lax.dynamic_index_in_dim(live_seq_bkt, t, axis=2, keepdims=False).reshape(b * k),
            cache=reorder(new_cache, parent_n),
            live_logprob_bk=live_logprob_bk,
            live_seq_bkt=live_seq_bkt,
            done_score_bk=done_score_bk,
            done_seq_bkt=_take_bk(all_seq_bjt, keep_bk),
        )

    s = jax.lax.while_loop(not_done, step_fn, state)

    # rows with fewer than K finished beams: append their best live beams (both lists are sorted)
    live_score_bk = s["live_logprob_bk"] / length_penalty_factor(steps, alpha)
    n_done = n_done_b1(s)
    j_bk = jnp.arange(k)[None, :]
    from_done_bk = j_bk < n_done
    live_idx_bk = jnp.clip(j_bk - n_done, 0, k - 1)
    scores_bk = jnp.where(from_done_bk, s["done_score_bk"], _take_bk(live_score_bk, live_idx_bk))
    tokens_bkt = jnp.where(from_done_bk[:, :, None], s["done_seq_bkt"], _take_bk(s["live_seq_bkt"], live_idx_bk))
    scores_bk, order_bk = jax.lax.top_k(scores_bk, k)  # finished and filled-in beams together, best first
    return _take_bk(tokens_bkt, order_bk), scores_bk


def sequence_logprob(
    logits_fn: LogitsFn, cache: Any, first_tokens_b: jax.Array, tokens_bt: jax.Array, *, eos_id: int
) -> jax.Array:
    """Teacher-forced sum of log p(tokens_bt[b, t] | ...) [B], up to and including the first EOS.

    ``cache`` has B rows (one per sequence); logits_fn is called once per position, as in beam_search.
    """

    def body(carry, token_b):
        prev_b, cache, total_b, ended_b = carry
        logits_bv, cache = logits_fn(prev_b, cache)
        logp_bv = jax.nn.log_softmax(logits_bv.astype(jnp.float32), axis=-1)
        logp_b = jnp.take_along_axis(logp_bv, token_b[:, None], axis=1)[:, 0]
        total_b = total_b + jnp.where(ended_b, 0.0, logp_b)
        return (token_b, cache, total_b, ended_b | (token_b == eos_id)), None

    b = first_tokens_b.shape[0]
    init = (first_tokens_b.astype(jnp.int32), cache, jnp.zeros((b,), jnp.float32), jnp.zeros((b,), bool))
    (_, _, total_b, _), _ = jax.lax.scan(body, init, jnp.asarray(tokens_bt, jnp.int32).T)
    return total_b
