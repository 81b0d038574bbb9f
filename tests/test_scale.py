"""Scale out: a 2-process ``qkv launch local`` run (stopped and resumed half way) equals one process
fed the same global batches, and its checkpoint restores in one process on another mesh."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from qkv.data import Tokenizer, make_lm_dataset
from qkv.train import checkpoint
from qkv.train.config import MeshConfig, load_config
from qkv.train.loop import open_split
from qkv.train.sharding import make_mesh, resolve_rules
from qkv.train.step import Trainer

pytestmark = pytest.mark.slow  # trains, compiles or runs processes: deselect with -m 'not slow'

TINY = ["model.vocab_size=512", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64",
        "model.max_seq_len=32", "data.seq_len=32", "train.batch_size=8", "data.eval_batches=2",
        "train.progress=false", "tokenizer.train_documents=40", "optim.warmup_steps=2",
        "train.steps=6", "train.log_every=1", "train.eval_every=3", "train.checkpoint_every=3"]
REPO = Path(__file__).resolve().parents[1]


def _args(corpus: Path, run_dir: Path, *extra: str) -> list[str]:
    return [*TINY, "data.source=files", f"data.path={corpus}", f"data.data_dir={run_dir.parent / 'tfds'}",
            "data.validation_fraction=0.1", f"train.run_dir={run_dir}", *extra]


def _logged_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def _launch(run_dir: Path, corpus: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "qkv.cli", "launch", "local", "--processes", "2", "--devices-per-process", "2",
           "--timeout", "240", "--", "pretrain", "tiny", *_args(corpus, run_dir, "mesh.data=2", "mesh.fsdp=2",
                                                                 *extra)]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "QKV_DEBUG": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def two_process_run(corpus, tmp_path_factory) -> Path:
    """Steps 1-3, stop with a checkpoint, then the same command resumes for steps 4-6 (both 2 processes)."""
    run_dir = tmp_path_factory.mktemp("scale") / "two"
    first = _launch(run_dir, corpus, "train.stop_at_step=3", "train.sample_tokens=0")
    assert json.loads(first.stdout.strip().splitlines()[-1])["step"] == 3
    out = _launch(run_dir, corpus, "train.sample_tokens=4")  # sampling from sharded params, too
    summary = json.loads(out.stdout.strip().splitlines()[-1])  # process 0's summary line, printed once
    assert summary["step"] == 6 and out.stdout.count('"step": 6') == 1 and "resumed" in out.stdout
    assert "4 cpu devices" in out.stdout and "'data': 2, 'fsdp': 2" in out.stdout
    meta = checkpoint.read_meta(run_dir)
    assert len(meta["data_per_process"]) == 2 and meta["data_per_process"][0] == meta["data"]
    return run_dir


def test_two_processes_equal_one_process_on_the_same_global_batches(two_process_run, corpus):
    """Each process reads documents [i::2]; one process builds the same global batch from both shards.

    Losses must agree across the 2-process stop/resume at step 3 too: each process resumes its own shard.
    """
    run_dir = two_process_run
    cfg = load_config("tiny", _args(corpus, run_dir))
    tok = Tokenizer.load(run_dir / "tokenizer.model")  # trained by process 0, used by both
    source = open_split(cfg, "train")
    shards = [iter(make_lm_dataset(source, tok.encode, seq_len=cfg.data.seq_len, batch_size=4, seed=cfg.train.seed,
                                   shard_index=i, shard_count=2, bos_id=tok.bos_id, eos_id=tok.eos_id,
                                   shuffle_rows=cfg.data.shuffle_rows))
              for i in range(2)]
    mesh = make_mesh(MeshConfig(data=2, fsdp=2), jax.devices()[:4])  # same mesh shape, 4 devices, 1 process
    trainer = Trainer(cfg.model, cfg.optim, mesh, resolve_rules({}), cfg.train.steps, cfg.train.seed)
    state = trainer.init_state()
    losses = []
    for _ in range(cfg.train.steps):
        parts = [next(it) for it in shards]
        batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        state, metrics = trainer.train_step(state, trainer.put_batch(batch))
        losses.append(float(metrics["loss"]))
    logged = _logged_losses(run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, 7))  # process 0 writes, once
    assert sorted(logged) == list(range(1, 7))
    np.testing.assert_allclose([logged[s] for s in range(1, 7)], losses, rtol=0, atol=1e-5)
    assert losses[-1] < losses[0]

    # The 2-process checkpoint (saved by both processes) restores in this one process on fsdp=4 x tensor=2.
    assert checkpoint.latest_step(run_dir) == 6
    other = Trainer(cfg.model, cfg.optim, make_mesh(MeshConfig(data=1, fsdp=4, tensor=2)), resolve_rules({}),
                    cfg.train.steps)
    restored, meta = checkpoint.restore(run_dir, other.abstract_state)
    assert meta["step"] == 6 and restored["params"]["embed"].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    want = jax.device_get(state)
    for a, b in zip(jax.tree.leaves(want["params"]), jax.tree.leaves(jax.device_get(restored["params"]))):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    for a, b in zip(jax.tree.leaves(want["opt_state"]), jax.tree.leaves(jax.device_get(restored["opt_state"]))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)

    import qkv
    lm = qkv.load(run_dir)  # the public API, default mesh
    ids = [tok.encode("def f(x):\n    return x\n")[:12]]
    np.testing.assert_allclose(lm.logits(ids), np.asarray(jax.jit(
        lambda p, t: __import__("flax").nnx.merge(trainer.graphdef, p)(t)[0])(state["params"], np.asarray(ids))),
        rtol=1e-5, atol=1e-5)


def _fake_python(tmp_path: Path) -> str:
    """Stands in for the interpreter: process 1 fails at once, the others would run for a minute."""
    script = tmp_path / "fake-python"
    script.write_text('#!/bin/sh\nif [ "$JAX_PROCESS_ID" = 1 ]; then echo "boom $JAX_NUM_CPU_DEVICES"; exit 3; fi\n'
                      'if [ "$FAKE_ALL_SLEEP" = 1 ] || [ "$JAX_PROCESS_ID" = 0 ]; then exec sleep 60; fi\n')
    script.chmod(0o755)
    return str(script)


def test_launch_propagates_the_first_failure_and_stops_the_others(tmp_path, capfd):
    import time
    from qkv.launch.local import launch_local

    started = time.monotonic()
    code = launch_local(["--", "pretrain"], processes=3, devices_per_process=2, timeout_s=60, grace_s=1,
                        python=_fake_python(tmp_path))
    assert code == 3 and time.monotonic() - started < 20
    err = capfd.readouterr().err
    assert "process 1 exited with code 3" in err and "[1] boom 2" in err  # the failed process's tail, prefixed


def test_launch_times_out(tmp_path, monkeypatch):
    from qkv.launch.local import launch_local

    monkeypatch.setenv("FAKE_ALL_SLEEP", "1")
    monkeypatch.setenv("JAX_PROCESS_ID", "")  # the launcher sets it per process anyway
    assert launch_local(["pretrain"], processes=1, timeout_s=1, grace_s=1, python=_fake_python(tmp_path)) == 124


def test_launch_needs_a_command():
    from qkv.launch.local import launch_local

    with pytest.raises(ValueError, match="nothing to launch"):
        launch_local(["--"], processes=2)


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_launch_forwards_ctrl_c_and_sigterm_to_every_process(tmp_path, sig):
    import signal
    import time

    fake = tmp_path / "fake-python"  # handles the signal like qkv pretrain does (checkpoint, exit 75)
    # Each line goes out in one write(2): the launcher runs its children unbuffered, so a print() of
    # several arguments would be several writes, which process 0 (on the launcher's own stdout) and the
    # pumped process 1 may interleave.
    fake.write_text(f"#!{sys.executable}\nimport os, signal, sys, time\n"
                    "def say(what):\n"
                    "    os.write(1, f\"proc {os.environ['JAX_PROCESS_ID']} {what}\\n\".encode())\n"
                    "def stop(signum, frame):\n"
                    "    say('got ' + signal.Signals(signum).name[3:])\n"
                    "    sys.exit(75)\n"
                    "signal.signal(signal.SIGINT, stop)\nsignal.signal(signal.SIGTERM, stop)\n"
                    "say('up')\ntime.sleep(60)\n")
    fake.chmod(0o755)
    code = f"import sys; from qkv.launch.local import launch_local; sys.exit(launch_local(['pretrain'], 2, " \
           f"python={str(fake)!r}, all_output=True, grace_s=30))"  # generous: a loaded machine is slow
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    lines = []
    while len([ln for ln in lines if " up" in ln]) < 2 and time.monotonic() < deadline:
        lines.append(p.stdout.readline())
    p.send_signal(getattr(signal, sig))
    out = "".join(lines) + p.communicate(timeout=30)[0]
    assert p.returncode == 128 + getattr(signal, sig), out
    name = sig.removeprefix("SIG")
    assert f"proc 0 got {name}" in out and f"[1] proc 1 got {name}" in out, out
