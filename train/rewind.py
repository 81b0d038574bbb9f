"""Loss-spike rewind (``train.spike_rewind``): what PaLM and OPT did by hand, done by the loop.

Policy. Every step's loss and gradient norm is compared with the last ``train.spike_window`` good steps:

    spike  <=>  loss or grad_norm is NaN/Inf
            or  loss > median(losses) + k * 1.4826 * MAD(losses)        (k = train.spike_k)
            or  grad_norm > train.spike_grad_factor * median(grad norms)

(after at least ``MIN_HISTORY`` good steps; a spike is never added to the history). With
``train.skip_nonfinite`` a NaN/Inf step is skipped instead (its update was never applied, so there is
nothing to rewind): the skip wins, the detector passes over the step, and ``MAX_CONSECUTIVE_SKIPS``
skipped steps in a row stop the run as before. Without it a NaN/Inf step is a spike and rewinds. The loop looks at
metrics at its log points and before every checkpoint, so a checkpoint never holds a state past a
detected spike: the newest checkpoint ``c`` always precedes the first spiking step ``s``.

Rewind. On a spike first seen at step ``s`` and detected at step ``d`` (the log point), the loop restores
checkpoint ``c`` (parameters, optimizer, data position, this detector's history), replays the batches of
steps ``c+1 .. s-1`` as before, and skips the batches of the spike window ``s .. d`` (the data iterator
is advanced past them), then continues. The total number of steps is unchanged. A spike seen at step
``s`` again after a rewind (a bad region longer than the window) skips further: the skips recorded at one
step add up. After
``train.spike_max_rewinds`` rewinds whose spikes lie within one window of ``spike_window`` steps, the run
stops with exit 3 (:class:`TrainingDiverged`), as a NaN does without rewinding.

Resumable. Each rewind is written to ``RUN/rewinds.json`` (atomically) *before* the state is restored. A
run killed during a rewind restarts from checkpoint ``c`` either way: with the record, it skips the same
batches at the same step; without it, it meets the same spike on the same data and decides the same.
"""
from __future__ import annotations

import json
import math
import os
from collections import deque
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from qkv.errors import UserError

MIN_HISTORY = 20  # good steps seen before the robust threshold is trusted
MAD_SCALE = 1.4826  # MAD -> standard deviation for normal data
PLAN_FILE = "rewinds.json"


class Spike(Exception):
    """Control flow from the loop to :func:`pretrain`: a spike first seen at ``step``, detected at ``detected_at``."""

    def __init__(self, step: int, detected_at: int, reason: str):
        super().__init__(f"loss spike at step {step}: {reason}")
        self.step, self.detected_at, self.reason = step, detected_at, reason


class SpikeDetector:
    """The running robust threshold over the last ``window`` good steps (see the module docstring)."""

    def __init__(self, window: int, k: float, grad_factor: float, history: list | None = None, start: int = 0):
        self.k, self.grad_factor, self.last_step = k, grad_factor, start  # steps <= last_step are already seen
        self.history: deque[tuple[float, float]] = deque((tuple(h) for h in history or ()), maxlen=window)

    def state(self) -> list[list[float]]:
        return [list(h) for h in self.history]

    def reason(self, loss: float, grad_norm: float) -> str | None:
        """Why (loss, grad_norm) is a spike, or None (then it joins the history)."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return f"loss {loss}, gradient norm {grad_norm}"
        if len(self.history) >= MIN_HISTORY:
            losses, grads = np.array(self.history).T
            median = float(np.median(losses))
            limit = median + self.k * MAD_SCALE * float(np.median(np.abs(losses - median)))
            if loss > limit:
                return f"loss {loss:.4f} > {limit:.4f} (median {median:.4f} + {self.k:g}·MAD of the last {len(losses)})"
            glimit = self.grad_factor * float(np.median(grads))
            if grad_norm > glimit:
                return f"gradient norm {grad_norm:.4g} > {glimit:.4g} ({self.grad_factor:g} × the median)"
        self.history.append((float(loss), float(grad_norm)))
        return None

    def check(self, first_step: int, records: list[dict[str, Any]]) -> None:
        """Raise :class:`Spike` at the first spiking step of ``records`` (steps first_step, first_step+1, ...).
        A step the train step skipped (``skipped``: NaN/Inf with train.skip_nonfinite) is passed over."""
        for i, m in enumerate(records):
            if first_step + i <= self.last_step:  # checked before a checkpoint, seen again at the log point
                continue
            if m.get("skipped", 0):  # its update was not applied: nothing to rewind, nothing to learn from
                self.last_step = first_step + i
                continue
            why = self.reason(float(m["loss"]), float(m["grad_norm"]))
            if why is not None:
                raise Spike(first_step + i, first_step + len(records) - 1, why)
            self.last_step = first_step + i


def load_plan(run_dir: Path) -> list[dict[str, int]]:
    path = Path(run_dir) / PLAN_FILE
    if not path.exists():
        return []
    try:
        plan = json.loads(path.read_text())
    except ValueError:
        raise UserError(f"{path} is damaged (not JSON): restore it from a backup, or delete it and the "
                        "checkpoints after its first rewind") from None
    return plan["rewinds"]


def save_plan(run_dir: Path, plan: list[dict[str, int]]) -> None:
    path = Path(run_dir) / PLAN_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"rewinds": plan}, indent=1))
    os.replace(tmp, path)


def record(plan: list[dict[str, int]], spike: Spike, restored: int, window: int,
           max_rewinds: int) -> dict[str, int] | None:
    """The plan entry for ``spike`` (skip the batches of steps spike.step .. spike.detected_at), or None when
    ``max_rewinds`` rewinds already lie within one window before it: this one would be the
    ``max_rewinds + 1``-th (the caller stops the run)."""
    recent = [r for r in plan if r["spike_step"] > spike.step - window]
    if len(recent) + 1 > max_rewinds:
        return None
    return {"spike_step": spike.step, "detected_at": spike.detected_at, "restored_step": restored,
            "skip_from": spike.step, "skipped_batches": spike.detected_at - spike.step + 1}


class SkippingIterator:
    """The training data iterator, except that at step ``skip_from`` of a plan entry it first discards that entry's
    ``skipped_batches`` batches (the entries of one step add up). ``start`` is the step the run (re)starts
    after; entries at or before it are already part of the restored iterator state."""

    def __init__(self, inner: Iterator, start: int, plan: list[dict[str, int]], log=print):
        self.inner, self.next_step, self.log = inner, start + 1, log
        self.skips: dict[int, int] = {}
        for r in plan:
            if r["skip_from"] > start:
                self.skips[r["skip_from"]] = self.skips.get(r["skip_from"], 0) + r["skipped_batches"]

    def __iter__(self) -> "SkippingIterator":
        return self

    def __next__(self):
        n = self.skips.pop(self.next_step, 0)
        if n:
            for _ in range(n):
                next(self.inner)
            self.log(f"skipped {n} data batches (the spike window) before step {self.next_step}")
        self.next_step += 1
        return next(self.inner)

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state) -> None:
        self.inner.set_state(state)
