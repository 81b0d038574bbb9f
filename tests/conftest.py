"""Shared test setup: 8 virtual CPU devices (for mesh tests) before any JAX backend starts."""
from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA:CPU's LLVM optimisation is most of a compile, and compiles are most of this suite's time: level 1
# compiles a tiny train step in about half the time of the default (measured: a 2-step run 17 s vs 23 s;
# level 0 saves no more and runs steps slower) and computes the same values (every numeric test compares
# against an independent reference with a tolerance, or two runs of the same program). Set before any
# backend starts, so the processes tests launch inherit it. Benchmarks and users keep XLA's default.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=1").strip()

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
