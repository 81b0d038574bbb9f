"""Orbax checkpoints of a run: parameters, optimizer state and everything needed to resume.

Each step directory holds three items, so readers take only what they need (generation restores
``params`` and ``meta``; resuming takes all three):

- ``params``    the parameter tree (sharded arrays; restored onto any mesh),
- ``opt_state`` optimizer moments and counters,
- ``meta``      JSON: step, the resolved config, the data-iterator state and the tokenizer model.

Orbax writes each step into a temporary directory (``<step>.orbax-checkpoint-tmp-*``) and renames it
when complete, so a crash mid-save never leaves a step that looks finished; ``latest_step`` only sees
complete steps, and the writing manager removes leftover temporary directories when it opens. Old
steps are deleted (``keep``) only after the newer step's commit has finished.

``meta`` also holds a checksum of every array (the wrapping uint32 sum of its bits), so a step whose
files were truncated, deleted or bit-flipped after the save is refused at restore
(:class:`DamagedCheckpoint`) instead of half-loaded. Nothing here unpickles: arrays are TensorStore
(zarr/OCDBT) files and everything else is JSON.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from qkv.errors import UserError

CHECKPOINT_SUBDIR = "checkpoints"


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir).expanduser().resolve() / CHECKPOINT_SUBDIR


DAMAGED_FIX = ("restore the step from a backup or delete it (qkv pretrain itself falls back to the newest good "
               "step)")


class DamagedCheckpoint(UserError):
    """A checkpoint step that exists but cannot be restored whole (truncated, deleted or altered files)."""


@functools.cache  # once per process
def _whole_arrays_on_cpu() -> None:
    """On CPU devices, save each replicated array whole from one replica.

    Orbax's default "replica-parallel" save splits a replicated array into one slice per replica so
    that TPU hosts write in parallel; on CPU devices (one host memory) it only adds a compiled slice
    per array and replica: 7 of 30 s of a 2-step run on 8 virtual devices. Saved files are the same.
    """
    if jax.default_backend() != "cpu":
        return
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # orbax warns that it replaces its own default handler: expected here
    try:
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)
    finally:
        absl.setLevel(level)


def manager(run_dir: str | Path, keep: int = 3, create: bool = True, writer: bool = False) -> ocp.CheckpointManager:
    """``writer=True`` (the one manager that saves) removes half-written temporary step directories."""
    _whole_arrays_on_cpu()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create, enable_async_checkpointing=True,
                                           cleanup_tmp_directories=writer)
    handlers = {"params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(checkpoint_dir(run_dir), options=options, item_handlers=handlers)


def encode_tokenizer(model_bytes: bytes) -> str:
    return base64.b64encode(model_bytes).decode("ascii")


def decode_tokenizer(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"))


def _bits_u32(x: jax.Array) -> jax.Array:
    """The wrapping uint32 sum of an array's bit patterns: any single flipped bit changes it."""
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    width = x.dtype.itemsize * 8
    if width > 32:
        raise TypeError(f"no checksum for {x.dtype}")
    bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{width}"))
    return jnp.sum(bits.astype(jnp.uint32), dtype=jnp.uint32)


@jax.jit
def _checksums_and_finite(tree: Any) -> tuple[Any, jax.Array]:
    sums = jax.tree.map(_bits_u32, tree)
    floats = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return sums, jnp.all(jnp.stack(floats)) if floats else jnp.bool_(True)


def checksums(tree: Any) -> tuple[dict[str, int], bool]:
    """({'path': uint32 checksum} for every array, whether every float is finite) in one device pass."""
    sums, finite = jax.device_get(_checksums_and_finite(tree))
    flat = jax.tree_util.tree_flatten_with_path(sums)[0]
    return {jax.tree_util.keystr(path): int(v) for path, v in flat}, bool(finite)


class NonFiniteState(ValueError):
    """Refusal to save a state holding NaN or Inf."""


def save(mngr: ocp.CheckpointManager, state: dict[str, Any], meta: dict[str, Any]) -> None:
    """Start an asynchronous save of ``state`` at its step; training continues while it writes.

    The arrays' checksums go into ``meta`` (verified on restore); a state with a NaN or Inf anywhere in
    its parameters or optimizer moments raises :class:`NonFiniteState` and is never written.
    """
    step = int(jax.device_get(state["step"]))
    sums, finite = checksums({"params": state["params"], "opt_state": state["opt_state"]})
    if not finite:
        raise NonFiniteState(f"the state at step {step} holds NaN or Inf values; not saving it")
    mngr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state["params"]),
        opt_state=ocp.args.StandardSave(state["opt_state"]),
        meta=ocp.args.JsonSave({**meta, "step": step, "checksums": sums}),
    ))


def latest_step(run_dir: str | Path) -> int | None:
    steps = all_steps(run_dir)
    return steps[-1] if steps else None


def all_steps(run_dir: str | Path) -> list[int]:
    """Complete (renamed, not temporary) step directories, oldest first."""
    directory = checkpoint_dir(run_dir)
    if not directory.is_dir():
        return []
    return sorted(manager(run_dir, create=False).all_steps())


def set_aside(run_dir: str | Path, step: int) -> Path:
    """Move a damaged step out of ``checkpoints/`` (to ``damaged-checkpoints/``) so it is kept for
    inspection but never restored or overwritten; returns its new place."""
    source = checkpoint_dir(run_dir) / str(step)
    target = Path(run_dir).expanduser().resolve() / "damaged-checkpoints" / f"{step}-{int(time.time())}"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(source), str(target))
    return target


def _chosen_step(mngr: ocp.CheckpointManager, run_dir: str | Path, step: int | None) -> int:
    """``step``, or the newest; a missing one is refused with the steps that do exist named."""
    steps = sorted(mngr.all_steps())
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint in {checkpoint_dir(run_dir)}: train first with qkv pretrain")
    if step is None:
        return steps[-1]
    if step not in steps:
        shown = ", ".join(map(str, steps[:20])) + (f", ... ({len(steps)} in all)" if len(steps) > 20 else "")
        raise FileNotFoundError(f"no checkpoint step {step} in {checkpoint_dir(run_dir)}: the steps there are "
                                f"{shown}: pass --step with one of them, or leave --step out for the newest")
    return step


def read_meta(run_dir: str | Path, step: int | None = None) -> dict[str, Any]:
    """The run metadata (config, step, data position, tokenizer) of ``step`` (default: the newest)."""
    mngr = manager(run_dir, create=False)
    step = _chosen_step(mngr, run_dir, step)
    where = checkpoint_dir(run_dir) / str(step) / "meta"
    try:
        with _quiet_stderr_on_failure():
            meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as err:  # noqa: BLE001 - a missing, cut or altered JSON file
        raise DamagedCheckpoint(f"checkpoint {where.parent} is damaged: its run metadata in {where} cannot be read "
                                f"({_first_line(err)}): {DAMAGED_FIX}") from err
    if not isinstance(meta, dict) or not {"config", "step"} <= set(meta):
        raise DamagedCheckpoint(f"checkpoint {where.parent} is damaged: {where} holds no run metadata (config, step): "
                                f"{DAMAGED_FIX}")
    return meta


def _shape_mismatch(abstract: Any, stored: Any) -> str | None:
    """The first parameter whose stored shape differs from the model's, as 'path: stored vs expected'."""
    stored_flat = dict(jax.tree_util.tree_flatten_with_path(stored)[0])
    for path, want in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        have = stored_flat.get(path)
        if have is None:
            return f"{jax.tree_util.keystr(path)} is missing from the checkpoint"
        if tuple(have.shape) != tuple(want.shape):
            return f"{jax.tree_util.keystr(path)} has shape {tuple(have.shape)} in the checkpoint, model expects {tuple(want.shape)}"
    return None


def _drop_closed_loop_noise() -> None:
    """During and after a failed read, TensorStore callbacks may report 'Event loop is closed' as
    unraisable exceptions; drop exactly those (everything else goes to the previous hook)."""
    previous = sys.unraisablehook
    if getattr(previous, "_qkv_filter", False):
        return

    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
            return
        previous(unraisable)

    hook._qkv_filter = True
    sys.unraisablehook = hook


class _AbandonedTaskFilter(logging.Filter):
    """asyncio logs 'Task exception was never retrieved' (or 'Future exception ...') when the tasks and
    futures of a failed (already reported) read are garbage-collected, possibly long after it; those
    records are dropped."""

    _ABANDONED = ("Task exception was never retrieved", "Future exception was never retrieved")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self._ABANDONED)


def _drop_abandoned_task_errors() -> None:
    logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _AbandonedTaskFilter) for f in logger.filters):
        logger.addFilter(_AbandonedTaskFilter())


class _DrainingLoop(asyncio.SelectorEventLoop):
    """An event loop that, closed with tasks still pending, cancels them and waits for them first.

    Orbax runs each synchronous restore in a fresh loop (``run_until_complete`` then ``close``). When one
    array read fails, ``asyncio.gather`` raises at once and the other reads are left pending in the closed
    loop; garbage collection later finalizes them one by one, printing "Exception ignored in: <coroutine
    _read_array_index_and_device_put>" and "Event loop is closed" tracebacks. Here they are cancelled and
    awaited (their ``finally`` blocks run, their TensorStore reads are released) before the loop closes.
    """

    def close(self) -> None:
        if not self.is_closed() and not self.is_running():
            pending = [task for task in asyncio.all_tasks(self) if not task.done()]
            for task in pending:
                task.cancel()
            if pending:
                self.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.run_until_complete(self.shutdown_asyncgens())
        super().close()


class _DrainingPolicy(asyncio.DefaultEventLoopPolicy):
    _loop_factory = _DrainingLoop


@contextlib.contextmanager
def draining_event_loops():
    """Event loops created inside (Orbax's, for a restore) drain their abandoned tasks when closed."""
    previous = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(_DrainingPolicy())
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(previous)


@contextlib.contextmanager
def _quiet_stderr_on_failure():
    """Hold back what is written to file descriptor 2 while reading a step. When the read fails,
    TensorStore callbacks racing Orbax's closed event loop print dozens of 'Event loop is closed'
    tracebacks there; those are dropped (the failure is reported as one line instead). When the read
    succeeds, whatever was written is passed on."""
    _drop_closed_loop_noise()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held, draining_event_loops():
        os.dup2(held.fileno(), 2)
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            _drop_abandoned_task_errors()
            time.sleep(0.2)  # let straggling callbacks finish printing into the held file
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if not failed:
                held.seek(0)
                text = held.read()
                if text:
                    sys.stderr.write(text.decode("utf-8", "replace"))


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{err.__class__.__name__}: {text[0][:120]}..." if text else err.__class__.__name__


def restore(run_dir: str | Path, abstract_state: dict[str, Any], step: int | None = None,
            with_optimizer: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, meta) restored onto the shardings in ``abstract_state`` (ShapeDtypeStructs).

    Without the optimizer, ``state`` holds only ``params`` and ``step``. A checkpoint of another
    model shape is refused with the first mismatching parameter named (ValueError); a step whose
    files are missing, truncated or altered raises :class:`DamagedCheckpoint`; never half-loaded.
    """
    mngr = manager(run_dir, create=False)
    step = _chosen_step(mngr, run_dir, step)
    where = f"checkpoint {checkpoint_dir(run_dir)}/{step}"
    try:
        with _quiet_stderr_on_failure():
            stored = mngr.item_metadata(step)["params"]
    except Exception as err:  # noqa: BLE001 - orbax/tensorstore raise many kinds; all mean "unreadable"
        raise DamagedCheckpoint(f"{where} is damaged: its array metadata cannot be read ({_first_line(err)}): "
                                f"{DAMAGED_FIX}") from err
    if stored is None:
        raise DamagedCheckpoint(f"{where} is damaged: it has no params item: {DAMAGED_FIX}")
    problem = _shape_mismatch(abstract_state["params"], stored)
    if problem:
        raise UserError(f"{where} does not fit this model: {problem}")
    items = {"params": ocp.args.StandardRestore(abstract_state["params"]), "meta": ocp.args.JsonRestore()}
    if with_optimizer:
        items["opt_state"] = ocp.args.StandardRestore(abstract_state["opt_state"])
    try:
        with _quiet_stderr_on_failure():
            restored = mngr.restore(step, args=ocp.args.Composite(**items))
    except Exception as err:  # noqa: BLE001
        raise DamagedCheckpoint(f"{where} is damaged: {_first_line(err)}: {DAMAGED_FIX}") from err
    meta = restored["meta"]
    expected = meta.get("checksums") if isinstance(meta, dict) else None
    if expected:  # checkpoints written before checksums existed are restored unverified
        tree = {"params": restored["params"]}
        if with_optimizer:
            tree["opt_state"] = restored["opt_state"]
        got, _ = checksums(tree)
        for key, value in got.items():
            if expected.get(key) != value:
                raise DamagedCheckpoint(f"{where} is damaged: {key} does not match the checksum written with it: "
                                        f"{DAMAGED_FIX}")
    state = {"params": restored["params"], "step": meta["step"]}
    if with_optimizer:
        state["opt_state"] = restored["opt_state"]
    return state, meta


def restore_newest_good(run_dir: str | Path, abstract_state: dict[str, Any],
                        check_meta: Callable[[dict[str, Any]], None] = lambda meta: None,
                        report: Callable[[str], None] = print) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Restore the newest step that reads back whole; damaged newer steps are reported and set aside.

    ``check_meta`` may refuse a readable step (raising ValueError): that stops the search, since it
    means the run itself does not match (another model), not that a file is damaged. Returns None when
    there are no steps; raises DamagedCheckpoint when there are steps but none is good.
    """
    steps = all_steps(run_dir)
    problems = []
    for step in reversed(steps):
        damage: DamagedCheckpoint | None = None
        try:
            try:
                meta = read_meta(run_dir, step)
            except Exception as err:  # noqa: BLE001
                raise DamagedCheckpoint(f"checkpoint {checkpoint_dir(run_dir)}/{step} is damaged: its meta "
                                        f"cannot be read ({_first_line(err)})") from err
            check_meta(meta)
            state, meta = restore(run_dir, abstract_state, step)
        except DamagedCheckpoint as err:
            damage = err
        if not _all_processes_ok(damage is None):  # one process's unreadable shard spoils the step for all
            reason = (str(damage).replace(f": {DAMAGED_FIX}", "") if damage is not None else
                      f"checkpoint {checkpoint_dir(run_dir)}/{step} is damaged: another process could not read it")
            problems.append(reason)
            if jax.process_index() == 0:
                moved = set_aside(run_dir, step)
                report(f"skipping {reason}; moved it to {moved}")
            _sync(f"qkv_set_aside_{step}")
            continue
        return state, meta
    if problems:
        raise DamagedCheckpoint(f"no checkpoint in {checkpoint_dir(run_dir)} could be restored ({problems[0]}): "
                                "the damaged steps were moved to damaged-checkpoints/; rerun to start afresh "
                                "or restore the files from a backup")
    return None


def _all_processes_ok(ok: bool) -> bool:
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils
    import numpy as np
    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def read_tokenizer(meta: dict[str, Any]):
    """The tokenizer stored in a checkpoint's metadata, or None (e.g. a converted model imported without one)."""
    from qkv.data import Tokenizer

    return Tokenizer.from_bytes(decode_tokenizer(meta["tokenizer"])) if "tokenizer" in meta else None


def save_params(run_dir: str | Path, params: Any, meta: dict[str, Any], step: int = 0) -> None:
    """A params-only checkpoint (no optimizer state), as ``qkv convert import`` and ``merge-lora`` write:
    readable by generate, evaluate, finetune and export. Refuses NaN/Inf parameters."""
    sums, finite = checksums({"params": params})
    if not finite:
        raise UserError("the parameters hold NaN or Inf: not writing them")
    mngr = manager(run_dir, keep=1)
    mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                            meta=ocp.args.JsonSave({**meta, "step": step, "checksums": sums})))
    mngr.wait_until_finished()
    mngr.close()
