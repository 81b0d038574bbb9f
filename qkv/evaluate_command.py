"""``qkv evaluate``: a checkpoint's loss, perplexity, bits per byte (and BLEU) on its own data split
(inference/evaluate.py), or, with ``--tasks``, lm-evaluation-harness tasks (inference/lm_eval_run.py,
docs/evaluation.md)."""
from __future__ import annotations

import argparse
import json

from qkv.chat_command import require_dir
from qkv.errors import UserError


def cmd_evaluate(ns: argparse.Namespace) -> int:
    if ns.tasks is not None:
        return evaluate_tasks(ns)
    for flag, value in (("--include-path", ns.include_path), ("--num-fewshot", ns.num_fewshot),
                        ("--limit", ns.limit), ("--batch-size", ns.batch_size)):
        if value is not None:
            raise UserError(f"{flag} applies to lm-eval tasks: pass --tasks NAME[,NAME...] with it")
    from qkv.inference.evaluate import evaluate
    from qkv.train.config import parse_override

    overrides: dict = {}
    for text in ns.overrides:
        key, value = parse_override(text)
        if "." not in key:
            raise UserError(f"override {text!r} must name a section, e.g. data.eval_batches=0")
        section, name = key.split(".", 1)
        overrides.setdefault(section, {})[name] = value
    require_dir(ns.checkpoint)
    result = evaluate(ns.checkpoint, overrides, split=ns.split, bleu=not ns.no_bleu, beam_size=ns.beam_size)
    if ns.baseline:  # gzip/bz2/xz on every document of the same split, one file at a time
        from qkv.tools.baselines import split_baselines
        result["baseline_bits_per_byte"] = split_baselines(ns.checkpoint, ns.split, overrides)
    print(json.dumps(result))
    return 0


def evaluate_tasks(ns: argparse.Namespace) -> int:
    """lm-eval's results table on stdout; its results JSON under RUN/eval/, the metrics in RUN/metrics.jsonl."""
    tasks = [t.strip() for t in ns.tasks.split(",") if t.strip()]
    if not tasks:
        raise UserError("--tasks is empty: name at least one lm-eval task, e.g. --tasks hellaswag,arc_easy")
    if ns.overrides or ns.baseline or ns.split != "validation" or ns.no_bleu or ns.beam_size != 1:
        raise UserError("--tasks runs lm-eval tasks: split, baseline, BLEU and config overrides apply to qkv "
                        "evaluate without --tasks")
    for flag, value in (("--num-fewshot", ns.num_fewshot), ("--batch-size", ns.batch_size)):
        if value is not None and value < (0 if flag == "--num-fewshot" else 1):
            raise UserError(f"{flag} {value} is out of range: pass a number >= {0 if flag == '--num-fewshot' else 1}")
    if ns.limit is not None and not ns.limit > 0:
        raise UserError(f"--limit {ns.limit} must be > 0: documents per task (or a fraction below 1)")
    limit = int(ns.limit) if ns.limit is not None and ns.limit >= 1 and ns.limit == int(ns.limit) else ns.limit
    from qkv.inference.lm_eval_run import require_lm_eval

    require_lm_eval()
    require_dir(ns.checkpoint)
    from lm_eval.utils import make_table

    from qkv.inference.lm_eval_run import run_tasks

    results, path = run_tasks(ns.checkpoint, tasks, ns.include_path, ns.num_fewshot, limit, ns.batch_size or 8)
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    print(f"results: {path}")
    return 0


def add_evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="loss, perplexity, accuracy (and BLEU) of a checkpoint, or lm-eval tasks")
    p.add_argument("--checkpoint", required=True, help="run directory written by qkv pretrain")
    p.add_argument("--split", default="validation", help="data split (e.g. test for the toy translation task)")
    p.add_argument("--beam-size", type=int, default=1, help="encoder-decoder BLEU: beam search width (1: greedy)")
    p.add_argument("--no-bleu", action="store_true", help="encoder-decoder: skip translating the split")
    p.add_argument("--baseline", action="store_true",
                   help="text: add gzip/bz2/xz bits per byte of the whole split, one document at a time")
    p.add_argument("--tasks", help="lm-eval tasks, comma-separated (e.g. hellaswag,arc_easy): run them instead "
                   "(decoders; needs pip install 'qkv[eval]')")
    p.add_argument("--include-path", help="with --tasks: a directory of extra lm-eval task YAML files")
    p.add_argument("--num-fewshot", type=int, help="with --tasks: few-shot examples per prompt (default: the task's)")
    p.add_argument("--limit", type=float, help="with --tasks: at most this many documents per task (< 1: a fraction)")
    p.add_argument("--batch-size", type=int, help="with --tasks: requests per compiled batch (default 8)")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.eval_batches=0 (whole split)")
    p.set_defaults(func=cmd_evaluate)
