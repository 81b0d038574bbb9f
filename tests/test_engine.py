"""The continuous-batching engine (inference/engine.py) without HTTP: replies equal ``Decoder.generate``'s alone
and beside others, per-request seeds, cancellation frees a slot, prompt log-probabilities equal float64 NumPy's."""
from __future__ import annotations

import contextlib
import functools
import threading

import numpy as np
import pytest

from model_reference import LEARNED, ROPE, randomize
from qkv.errors import UserError
from qkv.inference.decode import Decoder, SamplingConfig
from qkv.inference.engine import Engine, Request
from qkv.model import create_model, split_params

pytestmark = pytest.mark.slow  # compiles a prefill per prompt bucket and a step per slot count


def model(base):
    cfg = base.replace(max_seq_len=64, vocab_size=97, d_model=32)
    graphdef, params = split_params(create_model(cfg, seed=0))
    return cfg, graphdef, randomize(params, 1)


@contextlib.contextmanager
def running(cfg, graphdef, params):
    """An engine of ``SLOTS`` slots, started, and stopped at the end."""
    engine = Engine(cfg, graphdef, params, slots=SLOTS)
    engine.start()
    try:
        yield engine
    finally:
        engine.stop()


def run_all(engine: Engine, requests: list[dict]) -> list[list[int]]:
    """Submit every request at once; the token ids each got, in order."""
    out = [[] for _ in requests]
    done = threading.Semaphore(0)
    for got, r in zip(out, requests):
        engine.submit(Request(on_token=lambda t, got=got: got.append(t.id) or False,
                              on_done=lambda reason: done.release(), **r))
    for _ in requests:
        assert done.acquire(timeout=300)
    return out


SLOTS = 3  # one slot count throughout: engines of one graph share their compiled programs
PROMPTS = [[int(t) for t in np.random.default_rng(0).integers(1, 97, n)] for n in (3, 9, 17, 5, 30, 12, 7, 2, 21, 4)]


@pytest.mark.parametrize("base", [ROPE, LEARNED], ids=["rope", "learned"])
def test_greedy_replies_equal_generate_alone_and_beside_others(base):
    cfg, graphdef, params = model(base)
    decoder = Decoder(cfg, graphdef, SamplingConfig(temperature=0.0, max_new_tokens=20))
    expected = [decoder.generate(params, [p], 0, None)[0] for p in PROMPTS]
    with running(cfg, graphdef, params) as engine:
        together = run_all(engine, [{"prompt": p, "max_tokens": 20} for p in PROMPTS])  # 10 requests, 3 slots
        alone = [run_all(engine, [{"prompt": p, "max_tokens": 20}])[0] for p in PROMPTS[:3]]
        assert together == expected
        assert alone == expected[:3]
        assert engine.stats()["busy"] == 0 and engine.stats()["served"] == 13


def test_sampled_replies_depend_on_their_seed_only():
    cfg, graphdef, params = model(ROPE)
    with running(cfg, graphdef, params) as engine:
        sampled = {"temperature": 1.0, "top_k": 20, "top_p": 0.9, "max_tokens": 12}
        crowd = run_all(engine, [{"prompt": p, "seed": 7, **sampled} for p in PROMPTS[:6]])
        alone = run_all(engine, [{"prompt": PROMPTS[4], "seed": 7, **sampled}])[0]
        other_seed = run_all(engine, [{"prompt": PROMPTS[4], "seed": 8, **sampled}])[0]
        assert alone == crowd[4]
        assert other_seed != alone


def test_a_cancelled_request_frees_its_slot_and_the_next_one_takes_it():
    cfg, graphdef, params = model(ROPE)
    with running(cfg, graphdef, params) as engine:
        seen, ends = [[] for _ in range(SLOTS)], []
        started = threading.Semaphore(0)
        ended = threading.Semaphore(0)

        def on_token(token, got):
            if not got:
                started.release()
            got.append(token.id)
            return False

        longs = [Request(PROMPTS[i], 60, functools.partial(on_token, got=seen[i]),
                         lambda reason: (ends.append(reason), ended.release())) for i in range(SLOTS)]
        for request in longs:  # every slot busy for 60 tokens
            engine.submit(request)
        for _ in longs:
            assert started.acquire(timeout=300)
        longs[0].cancel()
        short = run_all(engine, [{"prompt": PROMPTS[5], "max_tokens": 3}])[0]  # waits for a slot: the cancelled one
        assert ended.acquire(timeout=300)
        assert ends[0] == "cancelled" and len(seen[0]) < 60 and len(short) == 3
        for _ in longs[1:]:
            assert ended.acquire(timeout=300)
        assert ends[1:] == ["length"] * (SLOTS - 1) and engine.stats()["busy"] == 0


def test_stop_ids_end_a_reply_and_the_context_caps_max_tokens():
    cfg, graphdef, params = model(ROPE)
    with running(cfg, graphdef, params) as engine:
        free = run_all(engine, [{"prompt": PROMPTS[4], "max_tokens": 10}])[0]
        stopped = run_all(engine, [{"prompt": PROMPTS[4], "max_tokens": 10, "stop_ids": (free[3],)}])[0]
        assert stopped == free[:free.index(free[3])]  # the stop id itself is not handed on
        capped = run_all(engine, [{"prompt": PROMPTS[4], "max_tokens": 1000}])[0]
        assert len(capped) == cfg.max_seq_len - len(PROMPTS[4])
        with pytest.raises(UserError, match="context is 64"):
            engine.submit(Request(list(range(1, 65)), 5, lambda t: False, lambda r: None))


def test_prompt_log_probabilities_equal_float64_numpy():
    from flax import nnx

    cfg, graphdef, params = model(ROPE)
    with running(cfg, graphdef, params) as engine:
        prompt = PROMPTS[4]
        got, done = [], threading.Event()
        engine.submit(Request(prompt, 1, lambda t: False, lambda r: done.set(), top_n=3, prompt_logprobs=True,
                              on_prompt=got.extend))
        assert done.wait(timeout=300)
        logits = np.asarray(nnx.merge(graphdef, params)(np.array([prompt], np.int32))[0], np.float64)[0]
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        expected = logp[np.arange(len(prompt) - 1), prompt[1:]]
        assert [t.id for t in got] == prompt[1:]
        np.testing.assert_allclose([t.logprob for t in got], expected, atol=1e-5)
        assert [t.top[0][0] for t in got] == logp[:-1].argmax(-1).tolist()
