"""``qkv benchmark serve``: throughput of ``qkv serve`` under concurrent clients, for several slot counts, in one
run (docs/decoding-benchmarks.md, "Serving"). Each slot count gets its own server process on loopback
(``ServeProcess``), all started and warmed up first (a round of every request with 2 new tokens compiles every
prompt bucket); then, in ``--rounds`` rounds taking turns between the servers, ``--clients`` clients (each with
its own HTTP connection, made before the clock starts) send their requests at once (greedy, mixed prompt and
reply lengths), and the wall time from the first send to the last reply gives tokens/s; the median round is
reported. The replies of every slot count and round must be the same text, which the report says."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from qkv.errors import UserError

WORDS = ("the cat sat on a mat while dogs ran in the park and birds sang over old trees near a river where "
         "children played").split()


class ServeProcess:
    """``qkv serve --checkpoint RUN --port 0 ...`` as a child process (``limit_s``: killed after that long
    whatever happens); ``url`` (…/v1) and ``base`` once it listens."""

    def __init__(self, run: str | Path, *args: str, env: dict[str, str] | None = None, limit_s: int = 900):
        command = ["timeout", "-s", "KILL", str(limit_s), sys.executable, "-m", "qkv.cli", "serve",
                   "--checkpoint", str(run), "--port", "0", *args]
        self.proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        while True:  # the line that says where it listens comes once the model has loaded and compiled
            line = self.proc.stderr.readline()
            if not line:
                self.proc.wait()
                raise UserError("qkv serve ended before listening: " + "".join(self.lines).strip().splitlines()[-1]
                                if self.lines else "qkv serve ended before listening")
            self.lines.append(line)
            if line.startswith("qkv: serving "):
                self.url = line.split(" on ", 1)[1].split()[0]
                break
        self.base = self.url.removesuffix("/v1")

    def stop(self) -> tuple[int, str]:
        """SIGTERM (``timeout`` passes it on), then the exit code and everything written to stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        rest = self.proc.stderr.read()
        code = self.proc.wait(timeout=300)
        return code, "".join(self.lines) + rest


def jobs(clients: int, max_tokens: int, prompt_words: int = 12, seed: int = 0) -> list[tuple[str, int]]:
    """(prompt, max_tokens) per client: 1 to ``prompt_words`` words, max_tokens/2 to max_tokens new tokens (a
    chat-like load: replies longer than prompts)."""
    import random

    rng = random.Random(seed)
    return [(" ".join(rng.choices(WORDS, k=rng.randint(1, prompt_words))),
             rng.randint(max(1, max_tokens // 2), max_tokens)) for _ in range(clients)]


def drive(url: str, work: list[tuple[str, int]]) -> tuple[float, int, list[str]]:
    """All ``work`` sent at once, one thread per client: (seconds, completion tokens, texts)."""
    import httpx

    texts: list[str] = [""] * len(work)
    tokens = [0] * len(work)
    errors: list[str] = []

    ready = threading.Barrier(len(work) + 1)  # every client made (an httpx client costs ~10 ms), then all go

    def client(i: int, prompt: str, max_tokens: int) -> None:
        with httpx.Client(timeout=1800) as session:
            ready.wait()
            r = session.post(f"{url}/completions", json={"prompt": prompt, "max_tokens": max_tokens,
                                                         "temperature": 0})
        if r.status_code != 200:
            errors.append(r.text)
            return
        body = r.json()
        texts[i], tokens[i] = body["choices"][0]["text"], body["usage"]["completion_tokens"]

    threads = [threading.Thread(target=client, args=(i, *w)) for i, w in enumerate(work)]
    for t in threads:
        t.start()
    ready.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    if errors:
        raise UserError(f"the server refused {len(errors)} requests: {errors[0][:200]}: raise --max-waiting")
    return seconds, sum(tokens), texts


def cmd_bench_serve(ns: argparse.Namespace) -> int:
    try:
        slot_counts = [int(s) for s in ns.slots.split(",")]
    except ValueError:
        raise UserError(f"--slots {ns.slots!r} must be comma-separated integers, e.g. 1,8") from None
    if not Path(ns.checkpoint).expanduser().is_dir():
        raise FileNotFoundError(f"checkpoint directory {ns.checkpoint!r} does not exist")
    work = jobs(ns.clients, ns.max_tokens, ns.prompt_words)
    servers = {}
    try:
        for slots in slot_counts:  # every server up and warm first, then the rounds take turns (same load for all)
            servers[slots] = ServeProcess(ns.checkpoint, "--slots", str(slots), "--max-waiting", str(max(64, ns.clients)))
            drive(servers[slots].url, [(p, 2) for p, _ in work])  # warm-up: compiles every prompt bucket
        timings: dict[int, list[tuple[float, int, list[str]]]] = {slots: [] for slots in slot_counts}
        for _ in range(ns.rounds):
            for slots in slot_counts:
                timings[slots].append(drive(servers[slots].url, work))
    finally:
        for slots, server in servers.items():
            code, err = server.stop()
            if code != 0:
                raise RuntimeError(f"qkv serve --slots {slots} exited {code}: {err[-500:]}")
    rows, reference = [], timings[slot_counts[0]][0][2]
    for slots in slot_counts:
        runs = sorted(timings[slots], key=lambda t: t[0])
        seconds, tokens, _ = runs[len(runs) // 2]  # the median round
        same = all(texts == reference for _, _, texts in runs)
        rows.append({"slots": slots, "clients": ns.clients, "rounds": ns.rounds, "seconds": round(seconds, 3),
                     "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1), "same_replies": same,
                     "seconds_all": [round(t[0], 3) for t in timings[slots]]})
        print(f"slots {slots:3d}: {tokens} tokens for {ns.clients} clients in {seconds:.2f} s (median of {ns.rounds}) "
              f"= {tokens / seconds:.1f} tokens/s; replies as the first setting's: {same}", flush=True)
    base = rows[0]["tokens_per_s"]
    for row in rows:
        row["speedup"] = round(row["tokens_per_s"] / base, 2)
    if len(rows) > 1:
        print("speedup over --slots " + str(rows[0]["slots"]) + ": " + ", ".join(
            f"{r['slots']} slots {r['speedup']}x" for r in rows[1:]))
    if ns.json:
        Path(ns.json).write_text(json.dumps({"checkpoint": str(ns.checkpoint), "rows": rows}, indent=1))
    return 0


def add_serve_benchmark(bsub) -> None:
    t = bsub.add_parser("serve", help="tokens/s of qkv serve under concurrent clients, per slot count")
    t.add_argument("--checkpoint", required=True, help="run directory of a decoder with a tokenizer")
    t.add_argument("--slots", default="1,8", help="slot counts to compare, comma-separated (the first is the base)")
    t.add_argument("--clients", type=int, default=32, help="clients sending one request each, all at once")
    t.add_argument("--max-tokens", type=int, default=96, help="the most new tokens a request asks for")
    t.add_argument("--prompt-words", type=int, default=12, help="prompts have 1 to this many words")
    t.add_argument("--rounds", type=int, default=3, help="timed rounds per slot count, taking turns (median reported)")
    t.add_argument("--json", help="write the rows to this JSON file")
    t.set_defaults(func=cmd_bench_serve)
