"""``qkv serve`` as a real process on loopback, driven by the official ``openai`` client and raw HTTP (httpx):
the endpoints, streaming, log-probabilities, errors, the API key, 32 concurrent clients and the SIGTERM drain."""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from serving import ServeProcess, instruct_run, stats  # noqa: E402

pytestmark = pytest.mark.slow  # builds a checkpoint and starts servers (each loads and compiles the model)
KEY = "test-key-123"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return instruct_run(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(run):
    proc = ServeProcess(run, "--slots", "4", "--max-waiting", "64")
    yield proc
    code, err = proc.stop()
    assert code == 0 and "Traceback" not in err, err


@pytest.fixture(scope="module")
def lm(run):
    import qkv

    return qkv.load(run)


def client(server, key="unused"):
    return openai.OpenAI(base_url=server.url, api_key=key, max_retries=0, timeout=300)


def test_completions_chat_and_streams_match_qkv_itself(server, lm):
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["run"]
    ids = lm.prompt_ids(["the cat sat"])[0]
    expected = lm.generate_ids([ids], max_new_tokens=12, temperature=0.0)[0]
    whole = c.completions.create(model="run", prompt=ids, max_tokens=12, temperature=0)
    assert whole.choices[0].text == lm.tokenizer.decode(expected)
    assert whole.usage.prompt_tokens == len(ids) and whole.usage.completion_tokens == len(expected) + (
        whole.choices[0].finish_reason == "stop")
    as_text = c.completions.create(model="run", prompt="the cat sat", max_tokens=12, temperature=0)
    assert as_text.choices[0].text == whole.choices[0].text  # text prompts get the tokenizer's bos, as qkv generate
    streamed = c.completions.create(model="run", prompt="the cat sat", max_tokens=12, temperature=0, stream=True)
    chunks = list(streamed)
    assert "".join(ch.choices[0].text for ch in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "where did the cat sit?"}]
    reply = lm.chat([messages], max_new_tokens=10, temperature=0.0)[0]
    chat = c.chat.completions.create(model="run", messages=messages, max_tokens=10, temperature=0)
    assert chat.choices[0].message.content == reply and chat.choices[0].message.role == "assistant"
    assert chat.usage.prompt_tokens == len(lm.chat_prompt_ids(messages))
    pieces = list(c.chat.completions.create(model="run", messages=messages, max_tokens=10, temperature=0,
                                            stream=True))
    assert pieces[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in pieces) == reply


def test_echo_logprobs_equal_the_models_own(server, lm):
    ids = lm.prompt_ids(["dogs ran in the park"])[0]
    out = client(server).completions.create(model="run", prompt=ids, max_tokens=1, temperature=0, echo=True,
                                            logprobs=3)
    lp = out.choices[0].logprobs
    logits = lm.logits([ids]).astype(np.float64)[0]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    expected = logp[np.arange(len(ids) - 1), ids[1:]]
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids) + 1
    np.testing.assert_allclose(lp.token_logprobs[1:len(ids)], expected, atol=1e-4)
    assert lp.token_logprobs[-1] == pytest.approx(logp[-1].max(), abs=1e-4)  # greedy: the likeliest
    # one dict entry per distinct token text (byte pieces of a random model can share one: at most 3)
    assert all(1 <= len(top) <= 3 for top in lp.top_logprobs[1:])
    assert [max(top.values()) for top in lp.top_logprobs[1:]] == pytest.approx(logp.max(-1), abs=1e-4)
    chat = client(server).chat.completions.create(model="run", messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=3, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) >= 1 and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content)  # greedy


def test_stop_strings_seeds_and_several_choices(server):
    c = client(server)
    free = c.completions.create(model="run", prompt="birds sang", max_tokens=16, temperature=0).choices[0].text
    stop = free[3:5]
    assert stop and free.find(stop) >= 3
    cut = c.completions.create(model="run", prompt="birds sang", max_tokens=16, temperature=0, stop=[stop, "zzz"])
    assert cut.choices[0].text == free[:free.find(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="run", prompt="birds sang", max_tokens=16, temperature=0, stop=stop, stream=True))
    assert streamed == cut.choices[0].text
    one = c.completions.create(model="run", prompt="old trees", max_tokens=8, temperature=1.0, seed=5, n=3)
    again = c.completions.create(model="run", prompt="old trees", max_tokens=8, temperature=1.0, seed=5, n=3)
    assert [x.text for x in one.choices] == [x.text for x in again.choices]
    assert [x.index for x in one.choices] == [0, 1, 2] and len({x.text for x in one.choices}) > 1


def post(server, path, body: bytes | dict, headers=None):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server.base}{path}", content=content, timeout=120,
                      headers={"Content-Type": "application/json", **(headers or {})})


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    ({"prompt": "a", "max_tokens": "5"}, 400, "max_tokens"),
    ({"prompt": "a", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": list(range(1, 200))}, 400, "prompt"),  # longer than the 128-token context
    ({"prompt": "a", "model": "gpt-4"}, 404, "model"),
    ({"prompt": "a" * (9 * 2**20)}, 413, None),
    ({"max_tokens": 3}, 400, "prompt"),
])
def test_bad_requests_get_an_openai_error_and_the_server_keeps_serving(server, body, status, param):
    r = post(server, "/v1/completions", body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] and error["param"] == param
    assert post(server, "/v1/completions", {"prompt": "a", "max_tokens": 2}).status_code == 200


def test_thirty_two_clients_at_once_get_their_sequential_replies(server):
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat while dogs ran in the park and birds sang over old trees".split()
    jobs = [(" ".join(rng.choice(words, int(rng.integers(1, 30)))), int(rng.integers(1, 40))) for _ in range(32)]
    c = client(server)
    sequential = [c.completions.create(model="run", prompt=p, max_tokens=m, temperature=0).choices[0].text
                  for p, m in jobs]
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        prompt, max_tokens = jobs[i]
        try:
            if i % 4 == 3:  # these leave after the first piece: their slots must come back
                with httpx.stream("POST", f"{server.url}/completions", timeout=300, json={
                        "prompt": prompt, "max_tokens": 100, "temperature": 0, "stream": True}) as r:
                    next(r.iter_lines())
                return
            results[i] = c.completions.create(model="run", prompt=prompt, max_tokens=max_tokens,
                                              temperature=0).choices[0].text
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors[:3]
    assert len(results) == 24 and all(results[i] == sequential[i] for i in results)
    for _ in range(600):  # the disconnected streams free their slots (polled, no timing assumed)
        s = stats(server.base)
        if s["busy"] == 0 and s["waiting"] == 0:
            break
        threading.Event().wait(0.1)
    assert s["busy"] == 0 and s["waiting"] == 0 and s["free"] == 4


def test_api_key_and_sigterm_drain(run, capsys):
    from qkv.cli import main

    capsys.readouterr()
    assert main(["serve", "--checkpoint", str(run), "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qkv: error:") and "--api-key" in err[0]

    proc = ServeProcess(run, "--slots", "2", "--api-key", KEY)
    try:
        for key in (None, "wrong"):
            r = httpx.get(f"{proc.url}/models", headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=60)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(proc, "wrong").models.list()
        assert client(proc, KEY).models.list().data[0].id == "run"
        # a long streamed reply is in flight when SIGTERM comes: it finishes, then the server exits 0
        pieces, reason = [], None
        with httpx.stream("POST", f"{proc.url}/completions", timeout=300, headers={"Authorization": f"Bearer {KEY}"},
                          json={"prompt": "the", "max_tokens": 100, "temperature": 0, "stream": True}) as r:
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: {"):
                    pieces.append(json.loads(line[6:]))
                    break
            proc.proc.send_signal(15)
            for line in lines:
                if line.startswith("data: {"):
                    pieces.append(json.loads(line[6:]))
                    reason = pieces[-1]["choices"][0]["finish_reason"] or reason
        assert reason in ("length", "stop") and len(pieces) >= 2
    finally:
        code, err = proc.stop()
    assert code == 0 and "Traceback" not in err and "qkv: stopped after" in err, err


def test_benchmark_serve_reports_tokens_per_second_and_the_same_replies_every_round(run, tmp_path, capsys):
    from qkv.cli import main

    out = tmp_path / "serve.json"
    assert main(["benchmark", "serve", "--checkpoint", str(run), "--slots", "2", "--clients", "4", "--rounds", "2",
                 "--max-tokens", "3", "--json", str(out)]) == 0  # one server: each process loads and compiles
    rows = json.loads(out.read_text())["rows"]
    assert [r["slots"] for r in rows] == [2] and rows[0]["same_replies"] and len(rows[0]["seconds_all"]) == 2
    assert 4 <= rows[0]["tokens"] <= 12 and rows[0]["tokens_per_s"] > 0 and rows[0]["speedup"] == 1.0
