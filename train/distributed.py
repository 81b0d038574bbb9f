"""Joining a multi-host run: ``jax.distributed.initialize`` before anything touches devices.

``auto`` initialises when the environment describes a multi-process job: explicit coordinator
variables (``JAX_COORDINATOR_ADDRESS`` with ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``), a SLURM
job step with several tasks, or a Cloud TPU VM slice with several workers. On one host nothing runs.
"""
from __future__ import annotations

import os

import jax

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
