"""Loss-spike rewind (train/rewind.py): the policy alone, then a real run with a poisoned batch that must be
rewound past (its spike window skipped), finish with a finite loss, and resume bit-identically after a
SIGKILL in the middle of the rewind."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qkv.train import checkpoint
from qkv.train.rewind import MIN_HISTORY, SkippingIterator, Spike, SpikeDetector, record



def test_detector_flags_loss_spikes_gradient_explosions_and_nonfinite_values():
    det = SpikeDetector(window=50, k=6.0, grad_factor=10.0)
    for i in range(MIN_HISTORY):
        assert det.reason(3.0 + 0.01 * (i % 5), 1.0) is None
    assert det.reason(3.05, 1.2) is None  # ordinary noise
    assert "loss 4.0000 >" in det.reason(4.0, 1.0)
    assert "gradient norm" in det.reason(3.0, 50.0)
    assert "nan" in det.reason(float("nan"), 1.0) and "inf" in det.reason(3.0, float("inf"))
    assert len(det.history) == MIN_HISTORY + 1  # spikes never join the history
    with pytest.raises(Spike) as info:
        det.check(100, [{"loss": 3.0, "grad_norm": 1.0}, {"loss": 9.0, "grad_norm": 1.0}, {"loss": 3.0, "grad_norm": 1.0}])
    assert (info.value.step, info.value.detected_at) == (101, 102)
    before = len(det.history)
    det.check(99, [{"loss": 3.0, "grad_norm": 1.0}])  # already seen (before a checkpoint): not counted twice
    assert len(det.history) == before


def test_early_steps_only_stop_on_nonfinite_values():
    det = SpikeDetector(window=50, k=6.0, grad_factor=10.0)
    assert det.reason(10.0, 100.0) is None and det.reason(1.0, 0.1) is None
    assert det.reason(float("nan"), 1.0) is not None


def test_skipping_iterator_discards_exactly_the_planned_batches():
    class Counter:
        def __init__(self):
            self.n = 0

        def __next__(self):
            self.n += 1
            return self.n

        def get_state(self):
            return {"n": self.n}

        def set_state(self, state):
            self.n = state["n"]

    plan = [{"spike_step": 5, "detected_at": 7, "restored_step": 3, "skip_from": 5, "skipped_batches": 3}]
    inner = Counter()
    inner.set_state({"n": 3})  # restored at step 3: batches 1..3 consumed
    it = SkippingIterator(inner, 3, plan, log=lambda m: None)
    assert [next(it) for _ in range(4)] == [4, 8, 9, 10]  # step 4 its batch, step 5 onward after skipping 5, 6, 7
    resumed = Counter()
    resumed.set_state({"n": 9})  # resumed at step 6, after the skip: nothing more to skip
    assert next(SkippingIterator(resumed, 6, plan, log=lambda m: None)) == 10


class _Counter:
    """A data iterator yielding 1, 2, 3, ... with a resumable position."""

    def __init__(self, n: int = 0):
        self.n = n

    def __next__(self):
        self.n += 1
        return self.n

    def get_state(self):
        return {"n": self.n}

    def set_state(self, state):
        self.n = state["n"]


def test_two_spikes_at_one_step_skip_both_windows_also_after_a_restart():
    """A bad region longer than the spike window: the spike at step 5 is seen (batches 5..7 skipped), the rewind
    meets bad data again at step 5 (batches 8..9, detected at step 6), and a second rewind to step 3 must skip
    all five batches, not only the last two (which would replay the bad batches 5..7)."""
    plan = []
    for spike in (Spike(5, 7, "x"), Spike(5, 6, "x")):
        plan.append(record(plan, spike, 3, window=20, max_rewinds=3))
    assert [r["skipped_batches"] for r in plan] == [3, 2]
    inner = _Counter(3)  # the checkpoint of step 3: batches 1..3 consumed
    it = SkippingIterator(inner, 3, plan, log=lambda m: None)
    assert [next(it) for _ in range(3)] == [4, 10, 11]
    restarted = SkippingIterator(_Counter(3), 3, json.loads(json.dumps(plan)), log=lambda m: None)  # a new process
    assert [next(restarted) for _ in range(3)] == [4, 10, 11]


def test_a_skipped_nonfinite_step_is_not_a_spike_with_skip_nonfinite():
    """train.skip_nonfinite and train.spike_rewind together: a NaN step the train step skipped (its update was
    not applied) is passed over, not rewound; a finite spike after it still rewinds. Without the skip (no
    ``skipped`` metric) a NaN step is a spike."""
    det = SpikeDetector(window=50, k=6.0, grad_factor=10.0)
    det.check(1, [{"loss": 3.0 + 0.01 * (i % 5), "grad_norm": 1.0} for i in range(MIN_HISTORY)])
    nan = float("nan")
    det.check(MIN_HISTORY + 1, [{"loss": nan, "grad_norm": nan, "skipped": 1}, {"loss": 3.01, "grad_norm": 1.0}])
    assert det.last_step == MIN_HISTORY + 2 and len(det.history) == MIN_HISTORY + 1
    with pytest.raises(Spike) as info:
        det.check(MIN_HISTORY + 3, [{"loss": nan, "grad_norm": nan, "skipped": 1}, {"loss": 9.0, "grad_norm": 1.0}])
    assert info.value.step == MIN_HISTORY + 4
    with pytest.raises(Spike) as info:
        det.check(MIN_HISTORY + 5, [{"loss": nan, "grad_norm": nan, "skipped": 0}])
    assert info.value.step == MIN_HISTORY + 5


def test_too_many_rewinds_in_one_window_stop():
    plan = []
    for step in (100, 120, 140):
        entry = record(plan, Spike(step, step + 2, "x"), step - 10, window=100, max_rewinds=3)
        assert entry is not None
        plan.append(entry)
    assert record(plan, Spike(160, 161, "x"), 150, window=100, max_rewinds=3) is None
    assert record(plan, Spike(300, 301, "x"), 290, window=100, max_rewinds=3) is not None  # the old ones left the window


# ----------------------------------------------------------------------------- a real run with a poisoned batch

POISON_STEP, STEPS = 33, 60
SMALL = ["model.vocab_size=512", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64",
         "model.max_seq_len=32", "data.seq_len=32", "train.batch_size=8", "data.eval_batches=1",
         "tokenizer.train_documents=40", "data.validation_fraction=0.1", "train.sample_tokens=0",
         "train.progress=false"]
RUNNER = r'''
import hashlib, os, sys
import jax
import numpy as np
from qkv.train import loop, tasks

POISON_STEP, RECORD, DRAWS = int(os.environ["POISON_STEP"]), os.environ["POISON_FILE"], os.environ["DRAWS_FILE"]
original_iter, original_build = tasks.LMTask.train_iter, loop.build_trainer


def digest(batch):
    return hashlib.sha256(np.asarray(batch["inputs"]).tobytes()).hexdigest()[:16]


class Logged:
    # Every batch drawn from the data pipeline, in order (the ones a rewind skips too); a fresh run
    # records the content of its POISON_STEP-th batch: that batch is the poisoned one wherever it shows up.
    def __init__(self, inner):
        self.inner, self.count = inner, 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.inner)
        self.count += 1
        if self.count == POISON_STEP and not os.path.exists(RECORD):
            with open(RECORD, "w") as f:
                f.write(digest(batch))
        with open(DRAWS, "a") as f:
            f.write(digest(batch) + (" poisoned" if is_poisoned(batch) else "") + "\n")
        return batch

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)


def is_poisoned(batch):
    return os.path.exists(RECORD) and open(RECORD).read() == digest(batch)


def build(cfg):
    # A step on the poisoned batch goes wrong the way a real spike does: its loss jumps and the update
    # it applies wrecks the parameters (scaled by 3), so the following steps are bad too.
    trainer = original_build(cfg)
    base, flag = type(trainer), {"next": False}

    def put_batch(self, batch):
        flag["next"] = is_poisoned(batch)
        return base.put_batch(self, batch)

    def train_step(self):
        step = base.train_step.fget(self)

        def call(state, batch):
            new, metrics = step(state, batch)
            if flag.pop("next", False):
                new = {**new, "params": jax.tree.map(lambda p: p * 3.0, new["params"])}
                metrics = {**metrics, "loss": metrics["loss"] * 10.0}
            return new, metrics
        return call

    trainer.__class__ = type("PoisonedTrainer", (base,), {"put_batch": put_batch, "train_step": property(train_step)})
    return trainer


tasks.LMTask.train_iter = lambda self, tok, source: Logged(original_iter(self, tok, source))
loop.build_trainer = build
from qkv.cli import main
sys.exit(main(sys.argv[1:]))
'''


def _argv(corpus: Path, run_dir: Path) -> list[str]:
    return ["pretrain", "tiny", *SMALL, "data.source=files", f"data.path={corpus}", f"data.data_dir={run_dir.parent / 'd'}",
            f"train.run_dir={run_dir}", f"train.steps={STEPS}", "train.log_every=5", "train.eval_every=1000",
            "train.checkpoint_every=10", "train.keep_checkpoints=2", "train.spike_rewind=true", "train.spike_window=20",
            "train.spike_k=4"]


def _start(tmp: Path, corpus: Path, run_dir: Path, name: str) -> subprocess.Popen:
    script = tmp / "runner.py"
    script.write_text(RUNNER)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "POISON_STEP": str(POISON_STEP),
           "POISON_FILE": str(tmp / f"{name}.poison"), "DRAWS_FILE": str(tmp / f"{name}.draws")}
    return subprocess.Popen([sys.executable, str(script), *_argv(corpus, run_dir)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


@pytest.mark.slow  # trains in subprocesses
def test_poisoned_batch_is_rewound_past_and_a_kill_mid_rewind_resumes_identically(corpus, tmp_path):
    straight = tmp_path / "straight"
    proc = _start(tmp_path, corpus, straight, "straight")
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]
    plan = json.loads((straight / "rewinds.json").read_text())["rewinds"]
    assert plan == [{"spike_step": POISON_STEP, "detected_at": 35, "restored_step": 30, "skip_from": POISON_STEP,
                     "skipped_batches": 3}], plan
    assert f"loss spike at step {POISON_STEP}" in out and "skipped 3 data batches" in out
    poisoned = [i for i, d in enumerate((tmp_path / "straight.draws").read_text().splitlines()) if "poisoned" in d]
    assert poisoned[0] == POISON_STEP - 1 and len(poisoned) == 2, poisoned  # drawn again only to be skipped
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["step"] == STEPS and math.isfinite(summary["train_loss"]) and math.isfinite(summary["val_loss"])
    losses = _losses(straight)
    assert sorted(losses) == list(range(5, STEPS + 1, 5)) and all(math.isfinite(v) for v in losses.values())
    assert losses[35] < max(losses[25], losses[30]) + 0.5, losses  # the rewound run's step 35, not the spike

    # The same run, SIGKILLed as soon as the rewind is recorded (restoring, or replaying before the skip).
    killed = tmp_path / "killed"
    proc = _start(tmp_path, corpus, killed, "killed")
    deadline = time.time() + 900
    while not (killed / "rewinds.json").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    resumed = _start(tmp_path, corpus, killed, "killed")
    out2, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, out2[-3000:]
    assert json.loads((killed / "rewinds.json").read_text())["rewinds"] == plan
    assert _losses(killed) == losses
    assert checkpoint.read_meta(killed)["checksums"] == checkpoint.read_meta(straight)["checksums"]
