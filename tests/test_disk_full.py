"""A disk that fills up during a checkpoint write (a small tmpfs as the run directory; needs root): one
`qkv: error:` line naming the step, the directory and the step a rerun resumes from, exit 2, no tracebacks;
after space is freed the rerun resumes there and ends with the same parameters as a run that never failed."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qkv.train import checkpoint

SMALL = ["model.vocab_size=512", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64",
         "model.max_seq_len=32", "data.seq_len=32", "train.batch_size=8", "data.eval_batches=1",
         "tokenizer.train_documents=40", "data.validation_fraction=0.1", "train.sample_tokens=0",
         "train.progress=false", "train.checkpoint_every=2", "train.keep_checkpoints=100", "train.eval_every=1000",
         "train.steps=12"]
FULL = re.compile(r"^qkv: error: the disk is full \(no space left on device\): the checkpoint of step (\d+) could "
                  r"not be written to (\S+); free space there \(or choose another train\.run_dir\) and run the same "
                  r"command again: it resumes from step (\d+), the last complete checkpoint$")


def _pretrain(corpus: Path, run_dir: Path) -> subprocess.CompletedProcess:
    argv = ["pretrain", "tiny", *SMALL, "data.source=files", f"data.path={corpus}",
            f"data.data_dir={run_dir.parent.parent / 'd'}", f"train.run_dir={run_dir}"]
    return subprocess.run([sys.executable, "-m", "qkv.cli", *argv], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs: room for the tokenizer and a few tiny checkpoints, not for twelve steps of them."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root (and a kernel that permits it here)")
    yield mnt
    subprocess.run(["umount", str(mnt)], capture_output=True)


AFTERMATH = re.compile(r"Traceback \(most recent call last\):\n(?:  .*\n)+RuntimeError: Event loop is closed\n")


@pytest.mark.slow  # three tiny trainings in subprocesses
def test_a_full_disk_is_one_line_and_the_rerun_resumes_bit_identically(small_disk, corpus, tmp_path):
    run_dir = small_disk / "run"
    out = _pretrain(corpus, run_dir)
    assert out.returncode == 2, out.stderr[-3000:]
    # Orbax's storage threads race the main thread at shutdown: rarely, one of them reports that its event loop
    # is already closed from native code, outside any Python hook qkv can install. That one report is the
    # storage layer's, not qkv's; everything else must be the one error line.
    stderr = AFTERMATH.sub("", out.stderr)
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr and not [ln for ln in lines if "RESOURCE_EXHAUSTED" in ln], out.stderr[-3000:]
    assert len(lines) <= 4, lines  # the run's own log lines (tokenizer, model) and the error
    match = FULL.match(lines[-1])
    assert match, lines[-1]
    failed, where, resume = int(match[1]), match[2], int(match[3])
    assert where == str(run_dir / "checkpoints") and resume == failed - 2 and resume >= 2
    assert checkpoint.all_steps(run_dir)[-1] == resume  # the last good checkpoint is there, whole

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)  # space freed
    again = _pretrain(corpus, run_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed {run_dir} at step {resume}" in again.stderr + again.stdout

    reference = tmp_path / "reference" / "run"  # the same run on a disk that never fills
    assert _pretrain(corpus, reference).returncode == 0
    ours, theirs = (checkpoint.read_meta(r, 12)["checksums"] for r in (run_dir, reference))
    assert ours == theirs  # bit-identical parameters and optimizer state
