"""One writer per run directory (train/run_lock.py): a second `qkv pretrain` on the run directory of a live
run is refused in one line naming the holder (host, pid) and touches nothing; a lock left by a dead process
is taken over."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from qkv.cli import main

SMALL = ["model.vocab_size=512", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64",
         "model.max_seq_len=32", "data.seq_len=32", "train.batch_size=8", "data.eval_batches=1",
         "tokenizer.train_documents=40", "data.validation_fraction=0.1", "train.sample_tokens=0",
         "train.progress=false", "train.checkpoint_every=2", "train.eval_every=1000"]
HOLDER = ("import sys; from pathlib import Path; from qkv.train.run_lock import RunLock; "
          "lock = RunLock(Path(sys.argv[1])); print('locked', flush=True); sys.stdin.read()")


def _argv(corpus: Path, run_dir: Path, steps: int) -> list[str]:
    return ["pretrain", "tiny", *SMALL, "data.source=files", f"data.path={corpus}",
            f"data.data_dir={run_dir.parent / 'd'}", f"train.run_dir={run_dir}", f"train.steps={steps}"]


def _hold(run_dir: Path) -> subprocess.Popen:
    """Another process holding the run directory's writer lock, as a running `qkv pretrain` does (it waits for
    its standard input to close); returns once it holds it (its 'locked' line: a handshake, no sleep)."""
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert p.stdout.readline().strip() == "locked"
    return p


def _snapshot(run_dir: Path) -> dict[str, str]:
    return {str(f.relative_to(run_dir)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(run_dir.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def first_run(corpus, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("lock") / "run"
    assert main(_argv(corpus, run_dir, 2)) == 0
    assert not (run_dir / "writer.lock").exists()  # released (and removed) when the run ends
    return run_dir


@pytest.mark.slow  # trains a tiny model
def test_a_second_writer_on_a_live_run_is_refused_in_one_line(first_run, corpus, capsys):
    holder = _hold(first_run)
    try:
        before = _snapshot(first_run)
        capsys.readouterr()
        code = main(_argv(corpus, first_run, 6))
        err = capsys.readouterr().err.strip().splitlines()
        assert _snapshot(first_run) == before  # nothing written, nothing removed (the holder's lock file neither)
        held = json.loads((first_run / "writer.lock").read_text())
    finally:
        holder.communicate("")
    assert code == 2
    assert len(err) == 1 and err[0].startswith("qkv: error: "), err
    assert "is in use by another run" in err[0]
    assert f"pid {holder.pid} on host {socket.gethostname()}" in err[0], err[0]
    assert held["pid"] == holder.pid


@pytest.mark.slow  # trains a tiny model
def test_the_lock_of_a_dead_writer_is_taken_over(first_run, corpus):
    holder = _hold(first_run)
    holder.send_signal(signal.SIGKILL)  # dies holding it: the file stays, naming a pid that is gone
    holder.wait()
    assert json.loads((first_run / "writer.lock").read_text())["pid"] == holder.pid
    assert main(_argv(corpus, first_run, 4)) == 0  # resumes at step 2 and trains to 4
    rows = [json.loads(line) for line in (first_run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 4
    assert not (first_run / "writer.lock").exists()


def test_a_refused_first_start_leaves_no_lock_and_no_folders(tmp_path, capsys):
    run_dir = tmp_path / "a" / "b" / "run"
    code = main(["pretrain", "tiny", "data.source=files", f"data.path={tmp_path / 'no-corpus'}",
                 f"train.run_dir={run_dir}", "train.progress=false"])
    assert code == 2 and "qkv: error: " in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
