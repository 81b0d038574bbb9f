"""``qkv evaluate --checkpoint RUN --tasks a,b``: lm-evaluation-harness tasks on a decoder run
(inference/lm_eval_model.py), results written beside the run: lm-eval's results JSON under ``RUN/eval/`` and
every metric in the run's ``metrics.jsonl`` and TensorBoard events (split ``lm_eval/<task>``, at the
checkpoint's step), as training writes its own."""
from __future__ import annotations

import difflib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

from qkv.errors import UserError
from qkv.train import checkpoint
from qkv.train.metrics import MetricsWriter

from .run import load_run


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError("lm-eval is not installed: pip install 'qkv[eval]' (the lm-evaluation-harness extra)") from None


def task_manager(names: Sequence[str], include_path: str | None = None):
    """An lm-eval TaskManager that knows every task named. Tasks found in ``include_path`` alone skip the scan
    of lm-eval's ~15k built-in task files (about 13 s); any other name needs it. Unknown names are refused."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise FileNotFoundError(f"--include-path {include_path!r} is not a directory of lm-eval task YAML files")
    if include_path is not None:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(n in local.all_subtasks for n in names):
            return local
    manager = TaskManager(include_path=include_path)
    unknown = [n for n in names if n not in manager.all_tasks and not Path(n).is_file()]
    if unknown:
        near = difflib.get_close_matches(unknown[0], manager.all_tasks, n=3)
        hint = f" (similar: {', '.join(near)})" if near else ""
        raise UserError(f"unknown lm-eval task {unknown[0]!r}{hint}: list them with lm-eval ls tasks, or pass "
                        "--include-path DIR holding its YAML")
    return manager


def metric_values(task_result: dict[str, Any]) -> dict[str, float]:
    """lm-eval's ``"acc,none": 0.5`` entries of one task as ``{"acc": 0.5}`` (``metric_filter`` where the filter
    is not "none"); stderr entries that are "N/A" are left out."""
    values = {}
    for key, value in task_result.items():
        if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        metric, filt = key.split(",", 1)
        if math.isfinite(float(value)):
            values[metric if filt == "none" else f"{metric}_{filt}"] = float(value)
    return values


def run_tasks(run_dir: str | Path, tasks: Sequence[str], include_path: str | None = None,
              num_fewshot: int | None = None, limit: float | None = None, batch_size: int = 8,
              step: int | None = None) -> tuple[dict[str, Any], Path]:
    """Run lm-eval ``tasks`` on the checkpoint; returns (lm-eval's results, the JSON file written)."""
    require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.utils import handle_non_serializable

    from .lm_eval_model import QkvLM, check_decoder

    run_dir = Path(run_dir)
    meta = checkpoint.read_meta(run_dir, step)
    check_decoder(meta["config"]["model"].get("kind", "decoder"), str(run_dir))
    manager = task_manager(list(tasks), include_path)
    lm = QkvLM(checkpoint=str(run_dir), batch_size=batch_size, run=load_run(run_dir, step))
    results = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                              task_manager=manager, log_samples=False)
    results["qkv"] = {"checkpoint": str(run_dir), "step": lm.run.step, "tasks": list(tasks)}
    folder = run_dir / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"lm_eval-step{lm.run.step}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False))
    os.replace(tmp, path)
    writer = MetricsWriter(run_dir)
    try:
        for task, task_result in results["results"].items():
            values = metric_values(task_result)
            if values:
                writer.write(lm.run.step, values, prefix=f"lm_eval/{task}")
    finally:
        writer.close()
    return results, path
