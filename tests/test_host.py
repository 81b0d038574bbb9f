"""The ``qkv`` command restarts itself once with glibc's transparent huge pages on (qkv/host.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from qkv.host import huge_page_env, launched_as_command

LINUX = {"system": "linux", "libc": ("glibc", "2.36"), "thp_mode": "madvise"}


def test_the_tunable_is_added_where_it_helps_and_nowhere_else():
    assert huge_page_env({"A": "1"}, **LINUX) == {"A": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    # other tunables are kept, in order
    env = huge_page_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, **LINUX)
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    # a user's own setting (0 opts out) wins, and the restarted process does not restart again
    assert huge_page_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, **LINUX) is None
    assert huge_page_env(env, **LINUX) is None
    for other in ({"system": "darwin"}, {"libc": ("", "")}, {"libc": ("glibc", "2.31")},
                  {"thp_mode": "always"}, {"thp_mode": "never"}, {"thp_mode": None}):
        assert huge_page_env({}, **{**LINUX, **other}) is None, other


def test_only_the_command_itself_restarts():
    assert not launched_as_command()  # pytest's process: a caller with work of its own is never re-executed


SMALL = ["model.vocab_size=256", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64",
         "model.max_seq_len=32", "data.seq_len=32", "train.batch_size=8"]


def test_the_command_runs_with_huge_pages_and_records_them(tmp_path):
    """A real ``qkv benchmark`` from an environment without the tunable: the record shows what its process had."""
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env["JAX_PLATFORMS"] = "cpu"
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "qkv.cli", "benchmark", "train", "tiny", *SMALL, "--steps", "1",
                           "--warmup", "0", "--json", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    recorded = json.loads(out.read_text())["records"][0]["machine"]["glibc_tunables"]
    # where they would not help (no glibc 2.35+, transparent huge pages not in madvise mode) nothing is set
    assert recorded == (None if huge_page_env(env) is None else "glibc.malloc.hugetlb=1")
