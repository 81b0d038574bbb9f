"""Keep CPU-only machines quiet when libtpu is installed (the ``tpu-compile`` extra).

With libtpu importable, JAX's first backend use on a machine without a TPU tries the TPU platform
and prints initialisation errors ("could not determine TPU accelerator type", "unexpected worker
hostname"), taking seconds. Before JAX starts, qkv's entry points call ``restrict_platforms``: when
libtpu is installed, ``JAX_PLATFORMS`` is unset and this machine shows no TPU, JAX is told to use
the platforms that are here (a CUDA GPU when one is, and the CPU). A real TPU or GPU is never
hidden, and an explicit ``JAX_PLATFORMS`` always wins. Without a TPU, several processes may also
load libtpu at once (``ALLOW_MULTIPLE_LIBTPU_LOAD``) for compile-only work. Compiling *for* a TPU slice
(``qkv plan --topology``) does not need the TPU platform: ``get_topology_desc`` works without it.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import sys


def tpu_present() -> bool:
    """A TPU VM shows its chips as /dev/accel* (v2-v5e) or /dev/vfio/N (v5p, v6e), or names them in env.
    (Not TPU_SKIP_MDS_QUERY / TPU_LIBRARY_PATH: JAX sets those itself when it finds libtpu.)"""
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*") or os.environ.get("TPU_ACCELERATOR_TYPE")
                or os.environ.get("TPU_WORKER_HOSTNAMES"))


def cuda_plugin_installed() -> bool:
    """JAX's CUDA plugin (the ``cuda`` extra) is importable: a GPU can be used, or compiled for without one."""
    return any(importlib.util.find_spec(name) for name in ("jax_cuda12_plugin", "jax_cuda13_plugin"))


def gpu_present() -> bool:
    return bool(glob.glob("/dev/nvidia[0-9]*")) and cuda_plugin_installed()


def restrict_platforms() -> str | None:
    """Set JAX's platforms to those present when libtpu would otherwise probe for a missing TPU;
    returns what was set (None: nothing to do)."""
    if importlib.util.find_spec("libtpu") is None or tpu_present():
        return None
    # Compile-only use (qkv plan --topology): several processes may load libtpu at once without a TPU
    # (else the second fails on /tmp/libtpu_lockfile). Read when libtpu loads, so set it first.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "true")
    if os.environ.get("JAX_PLATFORMS"):
        return None
    platforms = "cuda,cpu" if gpu_present() else "cpu"
    os.environ["JAX_PLATFORMS"] = platforms
    if "jax" in sys.modules:  # imported but (at qkv's entry) no backend started yet: the config still applies
        sys.modules["jax"].config.update("jax_platforms", platforms)
    return platforms
