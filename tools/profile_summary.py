"""Where the time of a profiled step went: XLA:CPU thunk time by op class, from a Perfetto trace.

``jax.profiler.trace(..., create_perfetto_trace=True)`` writes ``*.trace.json.gz``; every XLA op the
CPU runtime executes is an event carrying ``hlo_op`` and ``hlo_module``. Matmuls are the YNNPACK /
XNNPACK / oneDNN fusions; ``copy``/``transpose`` fusions are layout changes; ``wrapped_broadcast`` fills
fresh buffers (e.g. the stacked per-layer residuals of a scan).
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any


def _op_kind(name: str) -> str | None:
    """Coarse class of an XLA:CPU thunk from its HLO name (None: a loop or call that contains others)."""
    base = name.split(".")[0]
    if base in ("while", "call", "conditional") or base.startswith("end: "):
        return None
    if base.startswith(("ynn_fusion", "xnn_fusion", "dot", "onednn", "convolution")):
        return "matmul"
    if "copy" in base or "transpose" in base:
        return "copy/transpose"
    if base.startswith("wrapped_broadcast"):
        return "fill (buffer init)"
    if "scatter" in base or "gather" in base:
        return "gather/scatter"
    return "elementwise/reduce"


def summarize_trace(profile_dir: str, module: str, steps: int, top: int = 8) -> dict[str, Any] | None:
    """Seconds per step by op class and the top ops, from the newest Perfetto trace under ``profile_dir``
    (XLA:CPU thunks run on a pool of threads, so op seconds can add up to more than the wall time)."""
    traces = sorted(Path(profile_dir).rglob("*.trace.json.gz"), key=lambda f: f.stat().st_mtime)
    if not traces:
        return None
    events = json.loads(gzip.open(traces[-1]).read())
    events = events["traceEvents"] if isinstance(events, dict) else events
    by_kind: dict[str, float] = {}
    by_op: dict[str, float] = {}
    for e in events:
        args = e.get("args") or {}
        if e.get("ph") != "X" or "hlo_op" not in args or module not in str(args.get("hlo_module", "")):
            continue
        kind = _op_kind(e["name"])
        if kind is None:
            continue
        seconds = e.get("dur", 0) / 1e6 / steps
        by_kind[kind] = by_kind.get(kind, 0.0) + seconds
        by_op[e["name"]] = by_op.get(e["name"], 0.0) + seconds
    total = sum(by_kind.values()) or 1.0
    return {"trace": str(traces[-1]), "op_seconds_per_step": sum(by_kind.values()),
            "by_kind": {k: {"s": v, "share": v / total} for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "top_ops": [{"op": k, "s": v} for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])[:top]]}
