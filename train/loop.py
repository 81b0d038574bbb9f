"""The run lifecycle and the training loop, shared by ``pretrain`` and ``finetune``.

A run directory holds everything: ``config.yaml``, ``tokenizer.model``, ``metrics.jsonl``,
``tensorboard/`` and ``checkpoints/``. Running again on the same directory resumes from the newest
complete checkpoint with the same data order, so the losses continue exactly.

``run(cfg, make_job, report)`` is the one lifecycle: set up (a failed first start leaves nothing
behind), resume or start, write the config, drop metrics of steps that were never checkpointed, run
the loop (steps, logging, evaluation, checkpoints, NaN checks, SIGTERM), then the end-of-run
``report`` the caller passes (qkv.inference.report: a sample, BLEU). What differs between kinds of
run is a :class:`Job`: ``PretrainJob`` here, ``FinetuneJob`` in train/finetune.py.
"""
from __future__ import annotations

import dataclasses

import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from qkv.data import Tokenizer, iterator_state_from_json, iterator_state_to_json, train_tokenizer

from . import checkpoint, rewind, storage
from .config import Config, config_from_dict
from .distributed import all_processes_text, is_main_process, log, maybe_initialize, process_data_state, sync
from .metrics import MetricsWriter, flops_per_token
from .run_lock import RunLock
from .sharding import check_batch, make_mesh, resolve_rules
from .step import State, Trainer, run_eval
from .tasks import task_for
from .validate import check_run_dir, local_run_dir
from qkv.errors import UserError


def open_split(cfg: Config, split: str):
    return task_for(cfg).open(split)


def prepare_tokenizer(cfg: Config, run_dir: Path, texts, with_mask: bool = False) -> Tokenizer:
    """The configured tokenizer, or one trained on a seeded sample of ``texts`` (the training split's)."""
    if cfg.tokenizer.path:
        path = Path(cfg.tokenizer.path).expanduser()
        if not path.is_file():
            raise UserError(f"tokenizer.path={cfg.tokenizer.path!r} does not exist: point it at a .model file "
                            "or leave it unset to train one")
        return Tokenizer.load(path)
    target = run_dir / "tokenizer.model"
    if is_main_process() and not target.exists():  # decided by process 0 alone; the others wait
        rng = np.random.default_rng(cfg.train.seed)
        n = min(cfg.tokenizer.train_documents, len(texts))
        picks = sorted(rng.choice(len(texts), size=n, replace=False).tolist())
        started = time.time()
        partial = train_tokenizer(texts.__getitems__(picks), run_dir / ".tokenizer-partial",
                                  vocab_size=cfg.model.vocab_size, model_type=cfg.tokenizer.model_type,
                                  seed=cfg.train.seed, with_mask=with_mask)
        os.replace(partial, target)  # a crash mid-training never leaves a truncated tokenizer.model
        log(f"trained a {cfg.tokenizer.model_type} tokenizer on {n} documents in {time.time() - started:.1f}s")
    sync("tokenizer")
    return Tokenizer.load(target)


def check_resumable(cfg: Config, meta: dict[str, Any], run_dir: Path) -> None:
    """Refuse to resume a run whose saved model or data settings differ from ``cfg``'s. A run saved before
    ``data.shuffle_rows`` existed read its packed rows in document order: it counts as ``shuffle_rows=0``
    (its saved data position has no shuffle window), so it resumes with ``data.shuffle_rows=0``."""
    data = meta["config"].get("data", {})
    saved = config_from_dict(meta["config"] if "shuffle_rows" in data else
                             {**meta["config"], "data": {**data, "shuffle_rows": 0}})
    for section in ("model", "data"):
        old, new = getattr(saved, section), getattr(cfg, section)
        if section == "data":  # a mixture's weights may change on resume (the sampler logs it, data/mixture.py)
            old, new = _without_weights(old), _without_weights(new)
        if old != new:
            changed = [k for k in old.__dataclass_fields__ if getattr(old, k) != getattr(new, k)]
            key = changed[0]
            raise UserError(
                f"{run_dir} holds a run with {section}.{key}={getattr(old, key)!r}, not {getattr(new, key)!r}: "
                "use another train.run_dir or keep the saved settings"
            )


def _without_weights(data: Any) -> Any:
    if not data.mixture:
        return data
    return dataclasses.replace(data, mixture=[{k: v for k, v in e.items() if k != "weight"} for e in data.mixture])


def build_trainer(cfg: Config, **kwargs: Any) -> Trainer:
    """The trainer of ``cfg`` (pretraining objective unless ``objective=`` is given) on its mesh."""
    mesh = make_mesh(cfg.mesh)
    rules = resolve_rules(cfg.mesh.rules)
    check_batch(cfg.train.batch_size, mesh, rules)
    if cfg.train.batch_size % jax.process_count():
        raise UserError(f"train.batch_size={cfg.train.batch_size} must divide over {jax.process_count()} processes")
    if kwargs.get("objective") is None:  # fine-tuning passes its own (a classifier has no pretraining task)
        kwargs["objective"] = task_for(cfg).objective()
    return Trainer(cfg.model, cfg.optim, mesh, rules, cfg.train.steps, cfg.train.seed,
                   skip_nonfinite=cfg.train.skip_nonfinite, **kwargs)


EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGINT after writing a checkpoint; rerun to resume
EXIT_DIVERGED = 3  # the loss or gradient norm became NaN/Inf; the last good checkpoint is kept
MAX_CONSECUTIVE_SKIPS = 20  # with train.skip_nonfinite: stop when this many steps in a row were skipped


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN or Inf; nothing from that state was saved."""

    exit_code = EXIT_DIVERGED


class _StopSignals:
    """SIGTERM and SIGINT set a flag the loop reads between steps (finish the step, checkpoint, exit).

    Installed only around the training loop, and only from the main thread; the previous handlers
    come back afterwards. A second SIGINT stops at once (KeyboardInterrupt), as Ctrl-C twice should.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:  # noqa: ARG002 - signal handler signature
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""


class _StopAgreement:
    """Whether every process should stop now: all processes must stop after the same step.

    One process: the local flag, no cost. Several: each step contributes its flag to a tiny jitted
    max over all devices, read one step later (so the host stays one step ahead of the devices
    instead of waiting for each step); all processes read the same value at the same step.
    """

    def __init__(self, trainer: Trainer, signals: _StopSignals, rows: int) -> None:
        self.signals, self.rows, self.trainer = signals, rows, trainer
        self.multi = jax.process_count() > 1
        self._inflight = None
        if self.multi:
            from .sharding import replicated
            self._any = jax.jit(lambda f: jnp.max(f), out_shardings=replicated(trainer.mesh))

    def poll(self) -> bool:
        local = self.signals.signum is not None
        if not self.multi:
            return local
        agreed = bool(jax.device_get(self._inflight)) if self._inflight is not None else False
        flags = np.full((self.rows,), int(local), np.int32)
        self._inflight = self._any(jax.make_array_from_process_local_data(self.trainer.batch_sharding, flags))
        return agreed


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop metrics records after ``step`` (written by a run that died before its next checkpoint), so
    metrics.jsonl holds each step once after a resume. Replaced atomically."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash mid-write
            dropped += 1
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        _write_atomic(path, "".join(line + "\n" for line in kept))
        log(f"dropped {dropped} metrics records after step {step} (from an interrupted run)")


def _nonfinite_message(cfg: Config, step: int, record: dict[str, Any], good_step: int | None, run_dir: Path) -> str:
    what = "loss" if not math.isfinite(float(record["loss"])) else "gradient norm"
    value = float(record["loss"] if what == "loss" else record["grad_norm"])
    kept = (f"the last good checkpoint (step {good_step}) is kept in {checkpoint.checkpoint_dir(run_dir)}"
            if good_step is not None else "no checkpoint was written")
    return (f"{what} became {value} at step {step}; {kept}: lower optim.learning_rate (now "
            f"{cfg.optim.learning_rate:g}), raise optim.warmup_steps or set optim.grad_clip, or set "
            f"train.skip_nonfinite=true to skip such steps")


@dataclass(frozen=True)
class Finished:
    """What an end-of-run report gets: the run's config, trainer, the model's parameters (LoRA merged),
    tokenizer, and the job's validation data (pretraining: the validation split; fine-tuning: None)."""

    cfg: Config
    trainer: Trainer
    params: Any
    tok: Tokenizer
    validation: Any


Evaluate = Callable[[Any], dict[str, float]]  # params -> {"loss", "perplexity", "accuracy", ...}
Report = Callable[[Finished], dict[str, Any]]  # the end-of-run report (a sample, BLEU and translations)


class Job:
    """What a kind of run (pretraining, fine-tuning) supplies to the one lifecycle, ``run``."""

    name = "train"
    validation: Any = None
    chat: dict[str, Any] = {}  # a fine-tuning run's chat template and eos ids, kept in its checkpoints' meta

    def __init__(self, cfg: Config, trainer: Trainer):
        self.cfg, self.trainer = cfg, trainer

    def check_meta(self, meta: dict[str, Any], run_dir: Path) -> None:
        """Raise when the checkpoint in ``run_dir`` belongs to a different run."""
        check_resumable(self.cfg, meta, run_dir)

    def tokenizer(self, run_dir: Path, meta: dict[str, Any] | None) -> Tokenizer:
        """The tokenizer; ``meta`` is the restored checkpoint's (None on a first start)."""
        raise NotImplementedError

    def data(self, tok: Tokenizer) -> tuple[Any, Callable[[], Iterable[dict[str, np.ndarray]]]]:
        """(a checkpointable iterator of this process's training batches, a maker of its evaluation batches)."""
        raise NotImplementedError

    def source_evals(self) -> dict[str, Callable[[], Iterable[dict[str, np.ndarray]]]]:
        """Makers of each data source's own evaluation batches (a mixture's sources), evaluated as well."""
        return {}

    def init_state(self) -> State:
        """The train state of a first start."""
        return self.trainer.init_state()

    def frozen(self) -> Any:
        """The frozen tree passed to the compiled steps (the LoRA base, the DPO reference), or None."""
        return None

    def started(self, state: State) -> None:
        """Called once the state is ready (e.g. to log what is trained)."""


def run(cfg: Config, make_job: Callable[[Path], Job], report: Report | None = None) -> dict[str, Any]:
    """The run lifecycle shared by pretraining and fine-tuning; returns the loop's summary (plus the
    report's keys, unless the run was preempted)."""
    maybe_initialize(cfg.train.distributed)
    run_dir = local_run_dir(cfg.train.run_dir)
    check_run_dir(run_dir)
    created = run_dir  # the outermost folder a first start makes (removed again if it fails)
    while not created.parent.exists():
        created = created.parent
    fresh_dir = not run_dir.exists()
    # One writer per run directory (train/run_lock.py): a second run on it is refused here, before it touches
    # anything. Only process 0 writes the run directory's files, so only it holds the lock.
    lock = RunLock(run_dir) if is_main_process() else None
    try:
        return _run_locked(cfg, run_dir, make_job, report, lock, created if fresh_dir else None)
    finally:
        if lock is not None:
            lock.release()


def _run_locked(cfg: Config, run_dir: Path, make_job: Callable[[Path], Job], report: Report | None,
                lock: RunLock | None, created: Path | None) -> dict[str, Any]:
    try:
        job = make_job(run_dir)
        trainer, tok, state, data_iter, eval_batches, good_step = _setup(cfg, run_dir, job)
    except BaseException:
        # A failed first start leaves nothing behind: no half-made run directory to trip the next one.
        if created is not None and is_main_process() and created.exists():
            lock.release()
            shutil.rmtree(created, ignore_errors=True)
        raise
    spikes = None
    try:
        while True:  # once, or once more after each loss-spike rewind (train/rewind.py)
            if cfg.train.spike_rewind:
                data_iter, spikes = _spike_guard(cfg, run_dir, data_iter, good_step)
            try:
                summary, state = _train(cfg, run_dir, trainer, tok, state, data_iter, good_step, job.name,
                                        evaluate=lambda params: _evaluate(trainer, params, eval_batches, job),
                                        spikes=spikes, chat=job.chat)
                break
            except rewind.Spike as spike:
                state, good_step = _rewind(cfg, run_dir, trainer, data_iter, spike)
        if report is not None and not summary.get("preempted"):
            summary.update(report(Finished(cfg, trainer, trainer.model_params(state["params"]), tok, job.validation)))
    finally:
        trainer.frozen = None  # a cached trainer must not keep a base model alive
    return summary


def _disk_full(run_dir: Path, saves: list[int], done: int) -> storage.DiskFull:
    """The one-line error of a full disk: the first save that did not complete, the last one that did."""
    last_good = checkpoint.latest_step(run_dir)
    failed = [s for s in saves if last_good is None or s > last_good]
    return storage.disk_full_error(run_dir, failed[0] if failed else done, last_good, done)


def _close_run_files(mngr, writer: MetricsWriter, run_dir: Path, saves: list[int], done: int,
                     failing: BaseException | None) -> None:
    """Let an in-flight save of a good state complete (also when we stop on an error), then close. When an
    error is already on its way out, what these report is its consequence (a full disk fails every write
    after it): the first error is the one reported."""
    errors = []
    for close in (mngr.wait_until_finished, mngr.close, writer.close):
        try:
            close()
        except Exception as err:  # noqa: BLE001 - reported below, unless an earlier error is on its way out
            errors.append(err)
    if errors and failing is None:
        if storage.disk_full(errors[0]):
            raise _disk_full(run_dir, saves, done) from None
        raise errors[0]


def _evaluate(trainer: Trainer, params, eval_batches, job: Job) -> dict[str, Any]:
    """Validation metrics, with ``loss_<source>`` / ``bits_per_byte_<source>`` for each source of a mixture."""
    ev = run_eval(trainer, params, eval_batches())
    for name, batches in job.source_evals().items():
        sub = run_eval(trainer, params, batches())
        ev.update({f"{k}_{name}": sub[k] for k in ("loss", "bits_per_byte") if k in sub})
    return ev


def _spike_guard(cfg: Config, run_dir: Path, data_iter, step: int | None):
    """The data iterator with the recorded spike windows skipped, and the detector as of checkpoint ``step``."""
    t = cfg.train
    inner = data_iter.inner if isinstance(data_iter, rewind.SkippingIterator) else data_iter
    history = checkpoint.read_meta(run_dir, step).get("spike_history") if step is not None else None
    return (rewind.SkippingIterator(inner, step or 0, rewind.load_plan(run_dir), log),
            rewind.SpikeDetector(t.spike_window, t.spike_k, t.spike_grad_factor, history, step or 0))


def _rewind(cfg: Config, run_dir: Path, trainer: Trainer, data_iter, spike: rewind.Spike):
    """Record the rewind (before anything else: a kill from here on resumes the same way), restore the newest
    checkpoint (it precedes the spike) with its data position; returns (state, its step)."""
    t = cfg.train
    good_step = checkpoint.latest_step(run_dir)  # saves finished before the spike reached here; none is past it
    plan = rewind.load_plan(run_dir)
    entry = rewind.record(plan, spike, good_step or 0, t.spike_window, t.spike_max_rewinds) if good_step else None
    if entry is None:
        why = ("no checkpoint precedes it" if not good_step else
               f"{t.spike_max_rewinds} rewinds within {t.spike_window} steps")
        raise TrainingDiverged(f"{spike} and {why}: lower optim.learning_rate (now {cfg.optim.learning_rate:g}), raise "
                               "optim.warmup_steps, or raise train.spike_max_rewinds")
    if is_main_process():
        rewind.save_plan(run_dir, plan + [entry])
    sync("qkv_rewind")
    restored, meta = checkpoint.restore(run_dir, trainer.abstract_state, good_step)
    restored["step"] = jax.device_put(np.int32(restored["step"]), trainer.state_shardings["step"])
    data_iter.set_state(iterator_state_from_json(process_data_state(meta)))
    if is_main_process():
        _truncate_metrics(run_dir, good_step)
    log(f"{spike}; rewound to step {good_step}, skipping the batches of steps {spike.step}..{spike.detected_at}")
    return restored, good_step


def _setup(cfg: Config, run_dir: Path, job: Job):
    trainer = job.trainer
    if cfg.optim.warmup_steps >= cfg.train.steps:
        log(f"optim.warmup_steps={cfg.optim.warmup_steps} is not shorter than train.steps={cfg.train.steps}: "
            f"warming up over {max(cfg.train.steps - 1, 0)} steps instead")
    restored = checkpoint.restore_newest_good(run_dir, trainer.abstract_state,
                                              check_meta=lambda meta: job.check_meta(meta, run_dir), report=log)
    state, meta = restored if restored is not None else (None, None)
    if meta is None and is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
    tok = job.tokenizer(run_dir, meta)
    data_iter, eval_batches = job.data(tok)
    if meta is not None:
        state["step"] = jax.device_put(np.int32(state["step"]), trainer.state_shardings["step"])
        data_iter.set_state(iterator_state_from_json(process_data_state(meta)))  # this process's own position
        log(f"resumed {run_dir} at step {meta['step']}")
    else:
        state = job.init_state()
    trainer.frozen = job.frozen()
    if is_main_process():
        _write_atomic(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        _truncate_metrics(run_dir, meta["step"] if meta is not None else 0)
    job.started(state)
    return trainer, tok, state, data_iter, eval_batches, meta["step"] if meta is not None else None


class PretrainJob(Job):
    """Pretraining: the task of ``model.kind`` (train/tasks.py), a tokenizer trained on its data."""

    name = "pretrain"

    def __init__(self, cfg: Config):
        self.task = task_for(cfg)
        self.train_source, self.validation = self.task.open("train"), self.task.open("validation")
        super().__init__(cfg, build_trainer(cfg))

    def tokenizer(self, run_dir: Path, meta: dict[str, Any] | None) -> Tokenizer:
        if meta is not None:
            tok = checkpoint.read_tokenizer(meta)
        else:
            tok = prepare_tokenizer(self.cfg, run_dir, self.task.texts(self.train_source), self.task.with_mask)
        self.task.check_tokenizer(tok)
        return tok

    def source_evals(self):
        return self.task.source_evals(self._tok, self.validation)

    def data(self, tok: Tokenizer):
        self._tok = tok
        return (self.task.train_iter(tok, self.train_source),
                lambda: self.task.eval_batches(tok, self.validation))


def pretrain(cfg: Config, report: Report | None = None) -> dict[str, Any]:
    """Train (or resume) the run in ``cfg.train.run_dir``; returns a summary of the final state.

    Resumes from the newest checkpoint that reads back whole (damaged newer steps are set aside).
    SIGTERM/SIGINT end the run after the current step with a checkpoint and ``summary["preempted"]``
    set; a NaN/Inf loss or gradient norm raises :class:`TrainingDiverged` without saving that state.
    ``report`` (e.g. ``qkv.inference.report.pretrain_report(cfg)``) adds the end-of-run sample or BLEU.
    """
    return run(cfg, lambda run_dir: PretrainJob(cfg), report)


def _train(cfg: Config, run_dir: Path, trainer: Trainer, tok: Tokenizer, state: State, data_iter,
           good_step: int | None, name: str, evaluate: Evaluate,
           spikes: rewind.SpikeDetector | None = None,
           chat: dict[str, Any] | None = None) -> tuple[dict[str, Any], State]:
    """The training loop: steps, logging, evaluation, checkpoints, stops; returns (summary, final state).

    ``tokens_per_s`` counts every token the step processes (train.batch_size x data.seq_len, as ``qkv
    benchmark`` does) and ``loss_tokens_per_s`` those the loss counts; the first window starts after
    the step has compiled."""
    from qkv.model import count_params
    n_params = count_params(state["params"])
    log(f"model: {n_params / 1e6:.2f}M parameters; mesh {dict(trainer.mesh.shape)}; "
        f"{jax.device_count()} {jax.devices()[0].platform} devices; vocab {tok.vocab_size}")

    writer = MetricsWriter(run_dir)
    mngr = checkpoint.manager(run_dir, cfg.train.keep_checkpoints, writer=True)

    def meta_now() -> dict[str, Any]:
        data = iterator_state_to_json(data_iter.get_state())  # each process has its own position in its shard
        return {"config": cfg.to_dict(), "data": data, "data_per_process": all_processes_text(data),
                "tokenizer": checkpoint.encode_tokenizer(tok.to_bytes()),
                **(chat or {}),
                **({"spike_history": spikes.state()} if spikes is not None else {})}

    start = int(jax.device_get(state["step"]))
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    flops_per_step = flops_per_token(cfg.model, cfg.data.seq_len, cfg.data.source_len) * tokens_per_step
    end = min(cfg.train.stop_at_step or cfg.train.steps, cfg.train.steps)
    skip = cfg.train.skip_nonfinite
    bar = _progress(cfg, start, name)
    pending: list[dict[str, jax.Array]] = []
    window_start, last, ev = time.time(), {}, None
    consecutive_skips, done, preempted = 0, start, ""

    def check_finite(host: list[dict[str, Any]], count: bool = True) -> int:
        """Raise on the first NaN/Inf step of a window (unless skipped); returns the window's skip count."""
        nonlocal consecutive_skips
        first = done - len(host) + 1
        skipped = 0
        for i, m in enumerate(host):
            if skip and m.get("skipped", 0):
                skipped += 1
                consecutive_skips += count
                if consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
                    raise TrainingDiverged(
                        f"{consecutive_skips} steps in a row up to step {first + i} had a NaN/Inf loss or gradient "
                        f"and were skipped; " + _nonfinite_message(cfg, first + i, m, good_step, run_dir)
                        .split("; ", 1)[1])
                continue
            consecutive_skips = 0 if count else consecutive_skips
            if not (math.isfinite(float(m["loss"])) and math.isfinite(float(m["grad_norm"]))):
                raise TrainingDiverged(_nonfinite_message(cfg, first + i, m, good_step, run_dir))
        return skipped

    signals = _StopSignals()
    agreement = _StopAgreement(trainer, signals, cfg.train.batch_size // jax.process_count())
    saves: list[int] = []  # the steps whose (asynchronous) checkpoint save was started
    quiet = storage.QuietStorageFailures().__enter__()
    try:
        with signals:
            for step in range(start, end):
                state, metrics = trainer.train_step(state, trainer.put_batch(next(data_iter)))
                if step == start:
                    window_start = time.time()  # the step has compiled (jit compiles before dispatching)
                pending.append(metrics)
                done = step + 1
                stopping = agreement.poll() and done < end
                if done % cfg.train.log_every == 0 or done == end or stopping:
                    host = jax.device_get(pending)  # the only host sync in the loop
                    if spikes is not None:  # a spike rewinds (raises rewind.Spike) instead of stopping
                        spikes.check(done - len(host) + 1, host)
                    skipped = check_finite(host)
                    elapsed = time.time() - window_start
                    loss_tokens = sum(float(m["tokens"]) for m in host)
                    used = [m for m in host if not (skip and m.get("skipped", 0))] or host
                    last = {"loss": float(np.mean([m["loss"] for m in used])), "lr": float(host[-1]["lr"]),
                            "grad_norm": float(used[-1]["grad_norm"]),
                            "tokens_per_s": tokens_per_step * len(host) / elapsed,
                            "loss_tokens_per_s": loss_tokens / elapsed,
                            "tflops_per_device": flops_per_step * len(host) / elapsed / jax.device_count() / 1e12}
                    last.update({k: float(np.mean([m[k] for m in used])) for k in used[-1]  # e.g. DPO rewards
                                 if k not in ("loss", "lr", "grad_norm", "tokens", "skipped")})
                    if skip:
                        last["skipped"] = skipped
                    source_tokens = getattr(getattr(data_iter, "inner", data_iter), "source_tokens", None)
                    if source_tokens is not None:  # a streamed source or mixture: this process's tokens per source
                        last.update({f"tokens_{k}": v for k, v in source_tokens().items()})
                    writer.write(done, last)
                    pending, window_start = [], time.time()
                    if bar is not None:
                        bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_s']:.0f}")
                if bar is not None:
                    bar.update(1)
                if not stopping and (done % cfg.train.eval_every == 0 or done == end):
                    ev = evaluate(state["params"])
                    writer.write(done, ev, prefix="eval")
                    _bar_write(bar, f"step {done}: train loss {last.get('loss', float('nan')):.4f}, "
                                    f"val loss {ev['loss']:.4f}, val ppl {ev['perplexity']:.2f}"
                                    + (f", val bits/byte {ev['bits_per_byte']:.3f}" if "bits_per_byte" in ev else ""))
                    window_start = time.time()  # evaluation time is not training throughput
                if done % cfg.train.checkpoint_every == 0 or done == end or stopping:
                    if pending:  # steps not yet checked at a log point: never save a state past a NaN (or spike)
                        if spikes is not None:
                            spikes.check(done - len(pending) + 1, jax.device_get(pending))
                        check_finite(jax.device_get(pending), count=False)
                    try:
                        checkpoint.save(mngr, state, meta_now())  # also waits for the previous save to finish
                    except checkpoint.NonFiniteState:
                        raise TrainingDiverged(_nonfinite_message(
                            cfg, done, {"loss": float("nan"), "grad_norm": float("nan")}, good_step, run_dir)
                            .replace("loss became nan", "the parameters or optimizer state became NaN/Inf")) from None
                    saves.append(done)
                    good_step = done
                if stopping:
                    preempted = signals.name or "a stop agreed by another process"
                    break
    except Exception as err:
        if storage.disk_full(err):
            raise _disk_full(run_dir, saves, done) from None
        raise
    finally:
        if bar is not None:
            bar.close()
        _close_run_files(mngr, writer, run_dir, saves, done, failing=sys.exc_info()[1])
        quiet.__exit__(*sys.exc_info())

    summary: dict[str, Any] = {"step": done, "params": n_params, "run_dir": str(run_dir),
                               **{f"train_{k}": v for k, v in last.items()}}
    if preempted:
        summary["preempted"] = preempted
        log(f"stopped by {preempted} after step {done}; checkpoint {done} is complete")
        return summary, state
    ev = ev or evaluate(state["params"])  # the loop's last step always evaluates
    summary.update({f"val_{k}": v for k, v in ev.items() if k not in ("tokens", "pairs", "bytes")})
    return summary, state


def _progress(cfg: Config, start: int, name: str):
    if not (cfg.train.progress and is_main_process()):
        return None
    from tqdm import tqdm
    return tqdm(total=cfg.train.steps, initial=start, desc=name, unit="step", dynamic_ncols=True)


def _bar_write(bar, message: str) -> None:
    if bar is not None:
        bar.write(message)
    else:
        log(message)
