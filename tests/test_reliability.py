"""Reliability of `qkv pretrain` in real processes: SIGKILL at random moments (also mid-checkpoint),
SIGTERM preemption, NaN stops, damaged checkpoints. Every interrupted run must end bit-identical to an
uninterrupted run of the same config: every logged loss and every parameter and optimizer value."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qkv.train import checkpoint
from qkv.train.config import MeshConfig, config_from_dict, load_config
from qkv.train.sharding import make_mesh, resolve_rules
from qkv.train.step import Trainer

pytestmark = pytest.mark.slow  # trains, compiles or runs processes: deselect with -m 'not slow'

SMALL = ["model.vocab_size=512", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64",
         "model.max_seq_len=32", "data.seq_len=32", "train.batch_size=8", "data.eval_batches=2",
         "tokenizer.train_documents=40", "data.validation_fraction=0.1", "train.sample_tokens=0"]
STEPS = 100
TMP = ".orbax-checkpoint-tmp"


def pretrain_argv(corpus: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "qkv.cli", "pretrain", "tiny", *SMALL, "data.source=files", f"data.path={corpus}",
            f"data.data_dir={run_dir.parent / 'tfds'}", f"train.run_dir={run_dir}", f"train.steps={STEPS}",
            "train.log_every=1", "train.eval_every=1000", "train.progress=false", *extra]


def env() -> dict[str, str]:
    out = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return out


def run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, env=env(), timeout=600)


def start(argv: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(argv, stdout=log.open("a"), stderr=subprocess.STDOUT, env=env())


def train_records(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) of every train record in metrics.jsonl, in file order (duplicates kept)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue  # the line being written right now
        if r["split"] == "train":
            records.append((r["step"], r["loss"]))
    return records


def last_logged_step(run_dir: Path) -> int:
    records = train_records(run_dir)
    return records[-1][0] if records else 0


def final_state(run_dir: Path) -> dict:
    cfg = config_from_dict(checkpoint.read_meta(run_dir)["config"])
    trainer = Trainer(cfg.model, cfg.optim, make_mesh(MeshConfig(data=1), jax.devices()[:1]), resolve_rules({}),
                      cfg.train.steps)
    state, _ = checkpoint.restore(run_dir, trainer.abstract_state)
    return jax.device_get({"params": state["params"], "opt_state": state["opt_state"], "step": state["step"]})


def assert_same_run(reference: Path, other: Path) -> None:
    want, got = train_records(reference), train_records(other)
    assert [s for s, _ in got] == list(range(1, STEPS + 1))  # each step once, in order
    assert got == want  # bit-identical losses (floats compared exactly)
    a, b = final_state(reference), final_state(other)
    assert a["step"] == b["step"] == STEPS
    flat_a, flat_b = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), jax.tree_util.keystr(path)


def tmp_dirs(run_dir: Path) -> list[str]:
    d = run_dir / "checkpoints"
    return [n for n in os.listdir(d) if TMP in n] if d.is_dir() else []


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reliability")


@pytest.fixture(scope="module")
def reference(corpus, workdir) -> Path:
    """An uninterrupted run, checkpointing at 25, 50, 75 and 100."""
    run_dir = workdir / "reference"
    out = run(pretrain_argv(corpus, run_dir, "train.checkpoint_every=25", "train.keep_checkpoints=4"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert checkpoint.all_steps(run_dir) == [25, 50, 75, 100]
    return run_dir


def test_sigkill_at_random_moments_resumes_bit_identical(reference, corpus, workdir):
    """SIGKILL twice (seeded random steps, each while an async checkpoint write is in flight), restart
    with the same command each time: every loss and every final parameter equals the straight run.
    keep_checkpoints=1 also checks that the older step survives until the newer one is complete."""
    run_dir = workdir / "killed"
    argv = pretrain_argv(corpus, run_dir, "train.checkpoint_every=1", "train.keep_checkpoints=1")
    log = workdir / "killed.log"
    rng = random.Random(6)
    targets = [rng.randrange(10, 40), rng.randrange(50, 80)]
    killed_mid_write = 0
    for target in targets:
        proc = start(argv, log)
        while last_logged_step(run_dir) < target:
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.002)
        deadline = time.time() + 30
        while not tmp_dirs(run_dir) and time.time() < deadline:  # a checkpoint write in progress
            time.sleep(0.0005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        killed_mid_write += bool(tmp_dirs(run_dir))
        assert checkpoint.latest_step(run_dir) is not None  # the previous complete step is still there
    assert killed_mid_write >= 1  # at least one kill left a half-written step behind
    out = run(argv)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "dropped" in out.stdout  # metrics records after the resumed step were removed
    assert tmp_dirs(run_dir) == []  # half-written steps were cleaned up on restart
    assert checkpoint.all_steps(run_dir) == [STEPS]
    assert_same_run(reference, run_dir)


def test_sigterm_checkpoints_exits_75_and_resumes_identically(reference, corpus, workdir):
    run_dir = workdir / "preempted"
    argv = pretrain_argv(corpus, run_dir, "train.checkpoint_every=1000")
    log = workdir / "preempted.log"
    proc = start(argv, log)
    while last_logged_step(run_dir) < 20:
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.002)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 75, log.read_text()[-3000:]
    text = log.read_text()
    stopped = last_logged_step(run_dir)
    assert 20 <= stopped < STEPS
    assert f"qkv: stopped by SIGTERM after step {stopped} with a complete checkpoint" in text
    assert checkpoint.all_steps(run_dir) == [stopped] and tmp_dirs(run_dir) == []
    out = run(argv)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"resumed {run_dir} at step {stopped}" in out.stdout
    assert_same_run(reference, run_dir)  # also: two runs of one config are bit-identical


def _damage(step_dir: Path, how: str) -> None:
    files = sorted(p for p in (step_dir / ("opt_state" if how == "truncate" else "params")).rglob("*")
                   if p.is_file() and p.parent.name == "d")
    if how == "bitflip":  # the array chunks (not OCDBT's own b-tree nodes, which TensorStore does verify)
        files = [p for p in files if p.parent.parent.name.startswith("ocdbt.process")]
    assert files, list(step_dir.rglob("*"))
    if how == "delete":
        files[0].unlink()
    elif how == "truncate":
        for f in files:
            os.truncate(f, f.stat().st_size // 2)
    else:  # one flipped bit in each params data file: only the checksums in meta notice
        for f in files:
            data = bytearray(f.read_bytes())
            data[len(data) // 2] ^= 0x01
            f.write_bytes(bytes(data))


def test_damaged_checkpoints_fall_back_to_the_newest_good_step(reference, corpus, workdir):
    run_dir = workdir / "damaged"
    shutil.copytree(reference, run_dir)
    (run_dir / "checkpoints" / "100").rename(run_dir / "checkpoints" / "100.keep")  # resume from 75 ...
    _damage(run_dir / "checkpoints" / "75", "delete")   # ... which lost a params file,
    _damage(run_dir / "checkpoints" / "50", "truncate")  # 50: opt_state files cut in half,
    _damage(run_dir / "checkpoints" / "25", "bitflip")   # 25: bits flipped: nothing is good
    out = run(pretrain_argv(corpus, run_dir, "train.checkpoint_every=25", "train.keep_checkpoints=4"))
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qkv: error: no checkpoint in") and "could be restored" in err[0], err
    for step in (75, 50, 25):
        assert f"skipping checkpoint {run_dir / 'checkpoints'}/{step} is damaged" in out.stdout, out.stdout
    assert "does not match the checksum" in out.stdout
    assert sorted(p.name.split("-")[0] for p in (run_dir / "damaged-checkpoints").iterdir()) == ["25", "50", "75"]

    # With a good older step: put 50 back from the reference, damage 100 -> resumes at 50, ends identical.
    shutil.rmtree(run_dir / "damaged-checkpoints")
    shutil.copytree(reference / "checkpoints" / "50", run_dir / "checkpoints" / "50")
    (run_dir / "checkpoints" / "100.keep").rename(run_dir / "checkpoints" / "100")
    _damage(run_dir / "checkpoints" / "100", "delete")
    metrics = (reference / "metrics.jsonl").read_text()
    (run_dir / "metrics.jsonl").write_text(metrics)
    out = run(pretrain_argv(corpus, run_dir, "train.checkpoint_every=25", "train.keep_checkpoints=4"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"skipping checkpoint {run_dir / 'checkpoints'}/100 is damaged" in out.stdout
    assert f"resumed {run_dir} at step 50" in out.stdout
    assert_same_run(reference, run_dir)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(corpus, workdir):
    run_dir = workdir / "nan"
    out = run(pretrain_argv(corpus, run_dir, "optim.learning_rate=1e6", "train.checkpoint_every=1",
                            "train.log_every=4"))
    assert out.returncode == 3, out.stdout[-3000:] + out.stderr[-3000:]
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qkv: error: ") and "became nan at step" in err[0], err
    assert "lower optim.learning_rate" in err[0]
    bad_step = int(err[0].split("at step ")[1].split(";")[0])
    good = checkpoint.latest_step(run_dir)
    assert good is not None and good < bad_step and f"(step {good})" in err[0]
    state = final_state(run_dir)  # restores whole, and holds only finite numbers
    assert state["step"] == good
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))


def test_skip_nonfinite_keeps_the_state_and_counts_the_skip():
    cfg = load_config("tiny", SMALL + ["model.vocab_size=64", "data.seq_len=16", "optim.warmup_steps=0"])
    trainer = Trainer(cfg.model, cfg.optim, make_mesh(MeshConfig(data=1), jax.devices()[:1]), resolve_rules({}), 10,
                      skip_nonfinite=True)
    step = trainer.train_step
    rng = np.random.default_rng(0)
    toks = rng.integers(4, 64, (8, 17)).astype(np.int32)
    batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": np.ones((8, 16), np.int32),
             "positions": np.tile(np.arange(16, dtype=np.int32), (8, 1)), "loss_mask": np.ones((8, 16), np.int32)}
    state = trainer.init_state()
    state, m = step(state, trainer.put_batch(batch))
    assert int(m["skipped"]) == 0 and int(state["step"]) == 1
    poisoned = jax.tree.map(lambda x: x, state)
    poisoned["params"]["embed"] = poisoned["params"]["embed"].at[0, 0].set(jnp.nan)
    before = jax.device_get(poisoned)
    after, m = step(poisoned, trainer.put_batch(batch))
    assert int(m["skipped"]) == 1 and not np.isfinite(float(m["loss"])) and int(after["step"]) == 2
    for x, y in zip(jax.tree.leaves(before["params"]), jax.tree.leaves(jax.device_get(after["params"]))):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(corpus, workdir):
    """Multi-process: only process 1 is signalled; the flag is all-reduced, so both processes stop
    after the same step, write one collective checkpoint and exit 75; the same command resumes."""
    from qkv.launch.local import free_port, process_env
    run_dir = workdir / "two-process"
    argv = pretrain_argv(corpus, run_dir, "train.checkpoint_every=1000", "mesh.data=2", "train.steps=400")
    port = free_port()
    logs = [workdir / f"two-process-{i}.log" for i in range(2)]
    procs = [subprocess.Popen(argv, env=process_env(i, 2, 1, port, env()), stdout=logs[i].open("w"),
                              stderr=subprocess.STDOUT) for i in range(2)]
    try:
        while last_logged_step(run_dir) < 10:
            assert all(p.poll() is None for p in procs), logs[0].read_text()[-2000:] + logs[1].read_text()[-2000:]
            time.sleep(0.005)
        procs[1].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [75, 75], logs[0].read_text()[-2000:] + logs[1].read_text()[-2000:]
    stopped = checkpoint.latest_step(run_dir)
    assert stopped == last_logged_step(run_dir) and 10 <= stopped < 400
    for log in logs:  # both processes report the same step
        assert "qkv: stopped by " in log.read_text() and f"after step {stopped} " in log.read_text()
    assert "SIGTERM" in logs[1].read_text() and "another process" in logs[0].read_text()


def test_stop_signals_only_set_a_flag_inside_the_loop_and_restore_the_handlers():
    from qkv.train.loop import _StopSignals
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with _StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert signals.name == "SIGTERM"
    assert {s: signal.getsignal(s) for s in before} == before
    with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C stops at once
        with _StopSignals() as signals:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
            assert signals.name == "SIGINT"
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert {s: signal.getsignal(s) for s in before} == before


def test_abandoned_read_errors_are_dropped_and_other_asyncio_errors_kept():
    """A failed checkpoint read leaves asyncio tasks and futures whose exceptions are logged when they
    are garbage-collected; both kinds are dropped, any other asyncio error still shows."""
    import logging

    keep = checkpoint._AbandonedTaskFilter()

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, msg, None, None)

    assert not keep.filter(record("Task exception was never retrieved\nfuture: <Task ...>"))
    assert not keep.filter(record("Future exception was never retrieved\nfuture: <Future ...>"))
    assert keep.filter(record("Exception in callback Foo()"))
