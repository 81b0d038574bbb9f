"""Joining a multi-host run: ``jax.distributed.initialize`` before anything touches devices.

``auto`` initialises when the environment describes a multi-process job: explicit coordinator
variables (``JAX_COORDINATOR_ADDRESS`` with ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``), a SLURM
job step with several tasks, or a Cloud TPU VM slice with several workers. On one host nothing runs.
"""
from __future__ import annotations

import os

import jax
from qkv.errors import UserError

_initialized = False


def _multi_process_environment() -> bool:
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        return True
    return len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def maybe_initialize(mode: str = "auto", timeout_s: int = 300) -> None:
    """Initialise jax.distributed when ``mode`` is "on", or "auto" in a multi-process environment."""
    global _initialized
    if _initialized or mode == "off" or (mode == "auto" and not _multi_process_environment()):
        return
    env = os.environ
    kwargs = {"initialization_timeout": timeout_s}
    if env.get("JAX_COORDINATOR_ADDRESS"):
        kwargs.update(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                      num_processes=int(env["JAX_NUM_PROCESSES"]), process_id=int(env["JAX_PROCESS_ID"]))
    try:
        jax.distributed.initialize(**kwargs)  # SLURM and Cloud TPU are detected by JAX itself
    except Exception as err:  # noqa: BLE001 - one clear line instead of a gRPC stack trace
        raise ConnectionError(f"could not join the distributed run ({err.__class__.__name__}: {str(err).splitlines()[0]}); "
                              "check that every host started and the coordinator address is reachable") from err
    _initialized = True


def all_processes_text(text: str) -> list[str]:
    """Every process's ``text``, in process order, on every process (a collective: all must call it)."""
    if jax.process_count() == 1:
        return [text]
    import numpy as np
    from jax.experimental import multihost_utils

    data = np.frombuffer(text.encode("utf-8"), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int32))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return [bytes(row[:n]).decode("utf-8") for row, n in zip(rows, lengths)]


def process_data_state(meta: dict) -> str:
    """This process's data-iterator state from checkpoint meta.

    Each process reads its own shard of the data, so each has its own position in it: checkpoints
    keep one state per process (``data_per_process``), and a run resumes on as many processes as
    wrote it. (``data`` alone, process 0's state, is what single-process checkpoints hold.)
    """
    states = meta.get("data_per_process") or [meta["data"]]
    if len(states) != jax.process_count():
        raise UserError(f"the checkpoint was written by {len(states)} process(es) and this run has "
                        f"{jax.process_count()}: resume with {len(states)} (each process continues its own "
                        "shard of the data), or start a new train.run_dir")
    return states[jax.process_index()]


def is_main_process() -> bool:
    return jax.process_index() == 0


def log(message: str) -> None:
    """One line from process 0 only."""
    if is_main_process():  # one write: under `qkv launch` (unbuffered) other processes' lines cannot split it
        print(message + "\n", end="", flush=True)


def sync(name: str) -> None:
    """Wait until every process reaches this point (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
