"""Continuous batching: a fixed number of slots decoding over one preallocated KV cache (``qkv serve``).

The cache has one row per slot, each of the model's whole context (``init_cache(..., per_row=True)``: every row
keeps its own write position). One engine thread runs, over and over:

  1. admit   while a slot is free and a request waits: prefill its prompt alone (one row, its length rounded up
             to a ``bucket``, left-padded), copy that row into the free slot shifted left past the padding
             (``insert``: the slot holds exactly the prompt's keys and values, its write position = prompt
             length), and hand the request its first token.
  2. step    one ``step`` of every slot: busy slots feed their last token, free ones write padding that no real
             token attends to. Each request has its own temperature / top-k / top-p / seed (per-row ``Sampler``
             arrays); row r's key for its n-th token is fold_in(key(seed_r), n).
  3. retire  a request that ended (an end id, a stop string its consumer saw, max tokens, the context's end) or
             was cancelled (its client went away) frees its slot at once; the next waiting request takes it.

``prefill``, ``step`` and the sampler are inference/decode.py's, the programs ``qkv generate`` runs: one
compiled ``step`` for the engine's slot count and one ``prefill`` per prompt bucket. A request's tokens do not
depend on the other slots: each row's arithmetic is its own, in the same compiled program, so a greedy reply is
the same alone or beside others.
"""
from __future__ import annotations

import functools
import threading
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qkv.errors import UserError
from qkv.model.config import ModelConfig
from qkv.model.transformer import init_cache

from .decode import Sampler, bucket, left_pad, prefill, step

TOP_N = 20  # the most alternatives a request may ask log-probabilities of (OpenAI's top_logprobs limit)


class Busy(Exception):
    """Every slot is taken and the waiting line is full (HTTP 429)."""


class Draining(Exception):
    """The engine is shutting down and takes no new requests (HTTP 503)."""


@dataclass
class Token:
    """One produced token; with log-probabilities when the request asked (``logprob`` of this token at
    temperature 1, the ``top_n`` likeliest ids and theirs)."""

    id: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


@dataclass
class Request:
    """What to decode and where the results go. ``on_token(token) -> bool`` is called on the engine thread for
    every token (True: the consumer has seen enough, e.g. a stop string: the request ends as "stop");
    ``on_done(reason)`` once at the end: "stop" (an end id or the consumer), "length", "cancelled" or "error:
    ..."; ``on_prompt(tokens)`` before the first token when ``prompt_logprobs`` (one ``Token`` per prompt token
    after the first)."""

    prompt: list[int]
    max_tokens: int
    on_token: Callable[[Token], bool]
    on_done: Callable[[str], None]
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_ids: Sequence[int] = ()
    top_n: int = 0
    prompt_logprobs: bool = False
    on_prompt: Callable[[list[Token]], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    produced: int = 0

    def cancel(self) -> None:
        """The client went away: the engine frees the request's slot (or drops it from the line) at once."""
        self.cancelled.set()


@functools.partial(jax.jit, donate_argnums=(0,))
def insert(cache, row, slot, shift):
    """``cache`` with row 0 of ``row`` (a one-row cache of the same length) written into row ``slot``, moved left
    by ``shift`` slots (the prompt's left padding), so the slot holds the prompt at 0..n-1 and writes next at n."""
    def put(buffer, update, axis):  # axis: the length axis; the batch axis is the one before it
        update = jnp.roll(update, -shift, axis=axis).astype(buffer.dtype)
        start = [0] * buffer.ndim
        start[axis - 1] = slot
        return jax.lax.dynamic_update_slice(buffer, update, start)

    return {"k": put(cache["k"], row["k"], 2), "v": put(cache["v"], row["v"], 2),
            "segments": put(cache["segments"], row["segments"], 1),
            "index": cache["index"].at[slot].set(row["index"][0] - shift)}


@functools.lru_cache(maxsize=64)
def bound(which: str, graphdef: nnx.GraphDef, how: Sampler):
    """decode.py's ``prefill`` or ``step`` with a graph and sampler bound in: the same program, jitted once more
    around it, so that a call does not hash the model graph again (~0.1-0.3 ms a step); shared by every engine of
    the same graph."""
    fn = {"prefill": prefill, "step": step}[which]
    return jax.jit(functools.partial(fn, graphdef, how), donate_argnums=(3,))


class Engine:
    """``slots`` requests decoding together over one KV cache of the model's context; ``submit`` from any
    thread, ``start``/``stop`` the engine thread. ``vocab_limit``: only ids below it are produced (the
    tokenizer's vocabulary)."""

    def __init__(self, cfg: ModelConfig, graphdef: nnx.GraphDef, params: Any, slots: int = 8,
                 max_waiting: int = 64, vocab_limit: int = 0, pad_id: int = 0,
                 after_step: Callable[[], None] | None = None):
        if cfg.kind != "decoder":
            raise UserError(f"model.kind={cfg.kind!r}: serving needs a decoder checkpoint (one that generates text "
                            "after a prompt)")
        if not isinstance(slots, int) or slots < 1:
            raise UserError(f"--slots {slots} must be an integer >= 1 (requests decoded together)")
        self.cfg, self.graphdef, self.params = cfg, graphdef, params
        self.slots, self.max_waiting, self.pad_id = slots, max_waiting, pad_id
        self.context = cfg.max_seq_len
        self.how = {n: Sampler(None, None, None, vocab_limit, n) for n in (0, TOP_N)}
        self.cache = init_cache(cfg, slots, self.context, per_row=True)
        self.busy: list[Request | None] = [None] * slots
        self.token = np.zeros(slots, np.int32)
        self.position = np.zeros(slots, np.int32)
        self.rows = {"seed": np.zeros(slots, np.uint32), "count": np.zeros(slots, np.int32),
                     "temperature": np.zeros(slots, np.float32), "top_k": np.zeros(slots, np.int32),
                     "top_p": np.ones(slots, np.float32)}
        self.waiting: deque[Request] = deque()
        self.cv = threading.Condition()
        self.draining = False
        self.stopped = False
        self.thread: threading.Thread | None = None
        self.after_step = after_step  # called on the engine thread once a round's tokens are all handed out
        self.served = 0  # requests finished (any reason)
        self.tokens = 0  # tokens produced

    # -- the outside: submit, cancel (Request.cancel), stats, start/stop -----------------------------------------

    def check(self, prompt: Sequence[int], max_tokens: int) -> int:
        """How many new tokens a request may have (``max_tokens`` cut to the context left after the prompt);
        a prompt that leaves no room is refused."""
        room = self.context - len(prompt)
        if not prompt:
            raise UserError("the prompt is empty: give at least one token")
        if room < 1:
            raise UserError(f"the prompt has {len(prompt)} tokens and the model's context is {self.context}: "
                            "shorten the prompt")
        if not 0 <= min(prompt) <= max(prompt) < self.cfg.vocab_size:
            raise UserError(f"prompt token ids must be in 0..{self.cfg.vocab_size - 1} (the model's vocabulary)")
        return min(max_tokens, room)

    def submit(self, request: Request) -> None:
        request.max_tokens = self.check(request.prompt, request.max_tokens)
        with self.cv:
            if self.draining or self.stopped:
                raise Draining("the server is shutting down")
            if len(self.waiting) >= self.max_waiting:
                raise Busy(f"all {self.slots} slots are busy and {len(self.waiting)} requests wait")
            self.waiting.append(request)
            self.cv.notify()

    def stats(self) -> dict[str, int]:
        with self.cv:
            busy = sum(r is not None for r in self.busy)
            return {"slots": self.slots, "busy": busy, "free": self.slots - busy, "waiting": len(self.waiting),
                    "served": self.served, "tokens": self.tokens, "context": self.context}

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="qkv-engine", daemon=True)
        self.thread.start()

    def drain(self) -> None:
        """Take no new requests; those waiting or decoding finish."""
        with self.cv:
            self.draining = True
            self.cv.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Drain, then end the engine thread once nothing is left."""
        with self.cv:
            self.draining = self.stopped = True
            self.cv.notify()
        if self.thread is not None:
            self.thread.join(timeout)

    # -- the engine thread -----------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self.cv:
                    while not self.waiting and not any(self.busy) and not self.stopped:
                        self.cv.wait()
                    if self.stopped and not self.waiting and not any(self.busy):
                        return
                    admitted = self._take_waiting()
                for slot, request in admitted:
                    self._admit(slot, request)
                if any(self.busy):
                    self._step()
                if self.after_step is not None:
                    self.after_step()
        except Exception as err:  # a bug: every request gets it as its end, the engine takes no more
            text = f"error: {type(err).__name__}: {err}"
            traceback.print_exc()
            with self.cv:
                self.stopped = self.draining = True
                pending = [r for r in self.busy if r is not None] + list(self.waiting)
                self.busy, self.waiting = [None] * self.slots, deque()
            for request in pending:
                request.on_done(text)
            if self.after_step is not None:
                self.after_step()

    def _take_waiting(self) -> list[tuple[int, Request]]:
        """(free slot, waiting request) pairs, in arrival order; cancelled waiting requests are dropped."""
        admitted = []
        free = [i for i, r in enumerate(self.busy) if r is None]
        while free and self.waiting:
            request = self.waiting.popleft()
            if request.cancelled.is_set():
                self.served += 1
                request.on_done("cancelled")
                continue
            slot = free.pop(0)
            self.busy[slot] = request
            admitted.append((slot, request))
        return admitted

    def _program(self, which: str, how: Sampler):
        return bound(which, self.graphdef, how)

    def _rows_of(self, request: Request) -> dict[str, np.ndarray]:
        return {"seed": np.array([request.seed], np.uint32), "count": np.zeros(1, np.int32),
                "temperature": np.array([request.temperature], np.float32),
                "top_k": np.array([request.top_k], np.int32), "top_p": np.array([request.top_p], np.float32)}

    def _admit(self, slot: int, request: Request) -> None:
        n = len(request.prompt)
        width = min(bucket(n), self.context)
        tokens, segments = left_pad([request.prompt], self.pad_id, width)
        how = self.how[TOP_N if request.top_n else 0]._replace(prompt_logprobs=request.prompt_logprobs)
        row = init_cache(self.cfg, 1, self.context, per_row=True)
        out, row = self._program("prefill", how)(self.params, tokens, segments, row, rows=self._rows_of(request))
        self.cache = insert(self.cache, row, slot, width - n)
        for key, value in self._rows_of(request).items():
            self.rows[key][slot] = value[0]
        self.position[slot] = n
        if request.prompt_logprobs and request.on_prompt is not None:
            chosen, ids, lps = (np.asarray(a)[0, width - n:] for a in out["prompt"])
            request.on_prompt([Token(int(request.prompt[i + 1]), float(chosen[i]),
                                     list(zip(ids[i].tolist(), lps[i].tolist()))) for i in range(n - 1)])
        self._emit(slot, {key: np.asarray(value) for key, value in out.items() if key != "prompt"}, 0)

    def _step(self) -> None:
        active = np.array([r is not None for r in self.busy])
        top_n = TOP_N if any(r is not None and r.top_n for r in self.busy) else 0
        # copies: the step may read its host arguments after it returns, while these arrays change for the next
        rows = {key: value.copy() for key, value in self.rows.items()}
        out, self.cache = self._program("step", self.how[top_n])(self.params, self.token.copy(), self.position.copy(),
                                                                 self.cache, rows=rows, active_b=active)
        self.position[active] += 1  # the token just fed sat at position; the next one goes after it
        out = {key: np.asarray(value) for key, value in out.items()}  # one transfer per step
        for slot in np.flatnonzero(active):
            self._emit(int(slot), out, int(slot))

    def _emit(self, slot: int, out: dict[str, Any], row: int) -> None:
        """Hand slot ``slot``'s new token (row ``row`` of ``out``) to its request; free the slot if it ended."""
        request = self.busy[slot]
        token = int(np.asarray(out["token"])[row])
        result = Token(token)
        if request.top_n and "logprob" in out:
            result.logprob = float(np.asarray(out["logprob"])[row])
            ids, lps = np.asarray(out["top_ids"])[row], np.asarray(out["top_logprobs"])[row]
            result.top = list(zip(ids[:request.top_n].tolist(), lps[:request.top_n].tolist()))
        request.produced += 1
        self.tokens += 1
        self.token[slot], self.rows["count"][slot] = token, request.produced
        reason = None
        if request.cancelled.is_set():
            reason = "cancelled"
        elif token in request.stop_ids:
            reason = "stop"
        elif request.on_token(result):
            reason = "stop"
        elif request.produced >= request.max_tokens:
            reason = "length"
        if reason is not None:
            with self.cv:
                self.busy[slot] = None
                self.served += 1
            request.on_done(reason)
