"""``qkv launch local``: a multi-process JAX run on this machine, one OS process per "host".

    qkv launch local --processes 2 --devices-per-process 2 -- pretrain tiny mesh.data=2 mesh.fsdp=2

starts ``python -m qkv.cli pretrain ...`` twice with the variables ``train/distributed.py`` reads
(``JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``) plus
``JAX_PLATFORMS=cpu`` and K virtual CPU devices per process. It is the cheapest way to exercise the
multi-host code paths (per-process data shards, process-0 logging, collective checkpoints) without
a cluster.

Process 0's output goes straight to this terminal. The others' output is kept (last lines) and shown
with a ``[N]`` prefix only if that process fails, or streamed prefixed with ``--all-output``. The
first non-zero exit code wins: the remaining processes get SIGTERM, then SIGKILL after a grace
period. Ctrl-C (SIGINT) or a SIGTERM to the launcher is forwarded to every process, so they can
checkpoint and stop cleanly, then the same; the launcher exits 128 + the signal number.
"""
from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO, Sequence
from qkv.errors import UserError

GRACE_S = 10.0
TAIL_LINES = 40


def free_port() -> int:
    """A TCP port that was free a moment ago (the coordinator binds it shortly after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(process_id: int, processes: int, devices_per_process: int, port: int,
                base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of one process of the local job."""
    env = dict(os.environ if base is None else base)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env.update({
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
        "JAX_NUM_PROCESSES": str(processes),
        "JAX_PROCESS_ID": str(process_id),
        "JAX_PLATFORMS": "cpu",
        "JAX_NUM_CPU_DEVICES": str(devices_per_process),
        "XLA_FLAGS": " ".join(flags + [f"--xla_force_host_platform_device_count={devices_per_process}"]),
        "PYTHONUNBUFFERED": "1",
    })
    return env


def _pump(stream: IO[bytes], prefix: str, tail: collections.deque, out: IO[str] | None) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", "replace").rstrip("\n")
        tail.append(line)
        if out is not None:
            out.write(f"{prefix}{line}\n")
            out.flush()
    stream.close()


def _signal_all(procs: Sequence[subprocess.Popen], sig: int, only_alive: bool = True) -> None:
    for p in procs:
        if p.poll() is None or not only_alive:
            try:
                os.killpg(p.pid, sig)  # each child leads its own process group (start_new_session)
            except (ProcessLookupError, PermissionError):
                pass


def _stop_all(procs: Sequence[subprocess.Popen], first: int, grace_s: float, hurry=lambda: False) -> None:
    """``first`` (SIGTERM or SIGINT) to every live process, SIGKILL to those alive after ``grace_s`` (at once
    when ``hurry()`` turns true: a second Ctrl-C)."""
    _signal_all(procs, first)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(p.poll() is None for p in procs) and not hurry():
        time.sleep(0.05)
    _signal_all(procs, signal.SIGKILL, only_alive=False)  # also whatever a process left behind in its group
    for p in procs:
        p.wait()


class _Signals:
    """SIGINT/SIGTERM received by the launcher, in order. The handler only records them: the launcher acts on
    them at its own points (after starting a process, in its wait loop), so a signal can never cut the
    bookkeeping of the processes short (a process started but not yet in the list would never get it)."""

    def __init__(self):
        self.received: list[int] = []

    def __call__(self, signum: int, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.received.append(signum)


def launch_local(command: Sequence[str], processes: int, devices_per_process: int = 1, *,
                 timeout_s: float | None = None, all_output: bool = False, grace_s: float = GRACE_S,
                 python: str = sys.executable, port: int | None = None) -> int:
    """Run ``qkv <command>`` as ``processes`` cooperating JAX processes; returns the job's exit code.

    0 when every process exits 0; otherwise the first non-zero code observed (124 on timeout,
    130 on Ctrl-C, 143 on SIGTERM).
    """
    if processes < 1 or devices_per_process < 1:
        raise UserError(f"--processes={processes} and --devices-per-process={devices_per_process} must be >= 1")
    command = list(command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UserError("nothing to launch: give a qkv subcommand after --, e.g. -- pretrain tiny")
    port = port or free_port()
    previous, signals = {}, _Signals()
    if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
        previous = {sig: signal.signal(sig, signals) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _run(command, processes, devices_per_process, port, timeout_s, all_output, grace_s, python, signals)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(command: list[str], processes: int, devices_per_process: int, port: int, timeout_s: float | None,
         all_output: bool, grace_s: float, python: str, signals: _Signals) -> int:
    procs: list[subprocess.Popen] = []
    tails: list[collections.deque] = []
    pumps: list[threading.Thread] = []
    deadline = None if not timeout_s else time.monotonic() + timeout_s
    code = 0
    for i in range(processes):
        if signals.received:  # stopped while starting: start no more, stop those running (below)
            break
        env = process_env(i, processes, devices_per_process, port)
        if i == 0:
            p = subprocess.Popen([python, "-m", "qkv.cli", *command], env=env, start_new_session=True)
            tails.append(collections.deque())
        else:
            p = subprocess.Popen([python, "-m", "qkv.cli", *command], env=env, start_new_session=True,
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            tail: collections.deque = collections.deque(maxlen=None if all_output else TAIL_LINES)
            t = threading.Thread(target=_pump, args=(p.stdout, f"[{i}] ", tail, sys.stderr if all_output else None),
                                 daemon=True)
            t.start()
            tails.append(tail)
            pumps.append(t)
        procs.append(p)

    while True:
        if signals.received:
            signum = signals.received[0]
            print(f"qkv launch: {signal.Signals(signum).name}; forwarding it to every process", file=sys.stderr)
            code = 128 + signum
            _stop_all(procs, signum, grace_s, hurry=lambda: len(signals.received) > 1)  # 2nd: no more grace
            break
        codes = [p.poll() for p in procs]
        failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            i, code = failed[0]
            code = 128 - code if code < 0 else code  # killed by signal N: the shell's 128+N
            print(f"qkv launch: process {i} exited with code {code}; stopping the others", file=sys.stderr)
            _stop_all(procs, signal.SIGTERM, grace_s, hurry=lambda: bool(signals.received))
            if i > 0 and not all_output:
                for t in pumps:
                    t.join(timeout=2)
                for line in tails[i]:
                    print(f"[{i}] {line}", file=sys.stderr)
            break
        if all(c == 0 for c in codes):
            break
        if deadline is not None and time.monotonic() > deadline:
            print(f"qkv launch: timed out after {timeout_s:g}s; stopping all processes", file=sys.stderr)
            _stop_all(procs, signal.SIGTERM, grace_s, hurry=lambda: bool(signals.received))
            code = 124
            break
        time.sleep(0.1)
    for t in pumps:  # the children have exited: their last lines are in the pipes, finish printing them
        t.join(timeout=10)
    return code
