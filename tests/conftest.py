"""Shared test setup: 8 virtual CPU devices (for mesh tests) before any JAX backend starts."""
from __future__ import annotations

import importlib.util
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA:CPU's LLVM optimisation is most of a compile, and compiles are most of this suite's time: level 1
# compiles a tiny train step in about half the time of the default (measured: a 2-step run 17 s vs 23 s;
# level 0 saves no more and runs steps slower) and computes the same values (every numeric test compares
# against an independent reference with a tolerance, or two runs of the same program). Set before any
# backend starts, so the processes tests launch inherit it. Benchmarks and users keep XLA's default.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=1").strip()

# One persistent XLA compilation cache for the whole run, shared by the pytest-xdist workers and every process
# the tests start (they inherit the environment): many tests compile the same tiny programs. A fresh directory
# per run (a warm cache from an earlier run would hide compile work), removed at the end. A size limit turns on
# JAX's file lock, so two processes never read an entry while the other writes it. Measured on 2 cores
# (2026-12-05): the suite's summed test time fell from 1253 s to 1104 s, with ~27 s of that from a smaller TPU test.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ and importlib.util.find_spec("filelock") is not None:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="qkv-tests-xla-cache-")
    os.environ["QKV_TESTS_OWN_CACHE"] = os.environ["JAX_COMPILATION_CACHE_DIR"]  # removed by the process that made it
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
    os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(8 * 2**30)

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


import shutil  # noqa: E402
import sysconfig  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """About 40 standard-library modules copied into a directory: a small, real code corpus."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = tmp_path_factory.mktemp("corpus")
    picks = sorted(p for p in root.glob("*.py") if 2_000 < p.stat().st_size < 20_000)[:40]
    for p in picks:
        shutil.copy(p, out / p.name)
    return out


# The longest modules first (measured on 2 cores), so the two pytest-xdist workers (--dist loadfile hands out
# whole modules in collection order) do not end with one of them alone on a long module.
LONGEST_FIRST = ["test_tpu_plan", "test_tasks", "test_reliability", "test_train", "test_explain", "test_scale",
                 "test_shapes", "test_finetune", "test_cli", "test_rewind", "test_hf_checks", "test_inputs"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: order within a module is kept


def pytest_unconfigure(config):
    own = os.environ.get("QKV_TESTS_OWN_CACHE")
    if own and "PYTEST_XDIST_WORKER" not in os.environ and own == os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        shutil.rmtree(own, ignore_errors=True)
