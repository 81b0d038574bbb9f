"""Orbax checkpoints of a run: parameters, optimizer state and everything needed to resume.

Each step directory holds three items, so readers take only what they need (generation restores
``params`` and ``meta``; resuming takes all three):

- ``params``    the parameter tree (sharded arrays; restored onto any mesh),
- ``opt_state`` optimizer moments and counters,
- ``meta``      JSON: step, the resolved config, the data-iterator state and the tokenizer model.

Orbax writes each step into a temporary directory and renames it when complete, so a crash mid-save
never leaves a step that looks finished; ``latest_step`` only sees complete steps.
"""
from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

CHECKPOINT_SUBDIR = "checkpoints"


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir).expanduser().resolve() / CHECKPOINT_SUBDIR


def manager(run_dir: str | Path, keep: int = 3, create: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create, enable_async_checkpointing=True)
    handlers = {"params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(checkpoint_dir(run_dir), options=options, item_handlers=handlers)


def encode_tokenizer(model_bytes: bytes) -> str:
    return base64.b64encode(model_bytes).decode("ascii")


def decode_tokenizer(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"))


def save(mngr: ocp.CheckpointManager, state: dict[str, Any], meta: dict[str, Any]) -> None:
    """Start an asynchronous save of ``state`` at its step; training continues while it writes."""
    step = int(jax.device_get(state["step"]))
    mngr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state["params"]),
        opt_state=ocp.args.StandardSave(state["opt_state"]),
        meta=ocp.args.JsonSave({**meta, "step": step}),
    ))


def latest_step(run_dir: str | Path) -> int | None:
    directory = checkpoint_dir(run_dir)
    if not directory.is_dir():
        return None
    return manager(run_dir, create=False).latest_step()


def read_meta(run_dir: str | Path, step: int | None = None) -> dict[str, Any]:
    mngr = manager(run_dir, create=False)
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no complete checkpoint in {checkpoint_dir(run_dir)}: train first with qkv pretrain")
    return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


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


def restore(run_dir: str | Path, abstract_state: dict[str, Any], step: int | None = None,
            with_optimizer: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, meta) restored onto the shardings in ``abstract_state`` (ShapeDtypeStructs).

    Without the optimizer, ``state`` holds only ``params`` and ``step``. A checkpoint of another
    model shape is refused with the first mismatching parameter named, never half-loaded.
    """
    mngr = manager(run_dir, create=False)
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no complete checkpoint in {checkpoint_dir(run_dir)}: train first with qkv pretrain")
    stored = mngr.item_metadata(step)["params"]
    problem = _shape_mismatch(abstract_state["params"], stored) if stored is not None else None
    if problem:
        raise ValueError(f"checkpoint {checkpoint_dir(run_dir)}/{step} does not fit this model: {problem}")
    items = {"params": ocp.args.StandardRestore(abstract_state["params"]), "meta": ocp.args.JsonRestore()}
    if with_optimizer:
        items["opt_state"] = ocp.args.StandardRestore(abstract_state["opt_state"])
    restored = mngr.restore(step, args=ocp.args.Composite(**items))
    state = {"params": restored["params"], "step": restored["meta"]["step"]}
    if with_optimizer:
        state["opt_state"] = restored["opt_state"]
    return state, restored["meta"]
