"""``qkv benchmark generate --against transformers``: qkv's greedy generation against transformers' ``generate`` on
the same model, call by call as a user makes them (docs/decoding-benchmarks.md, "Generation against transformers").

The model (a checkpoint, or random parameters of CONFIG saved as one) is exported with qkv's own exporter
(``qkv convert export``) to a temporary Hugging Face directory and loaded back by transformers (float32, CPU).
Then, in one process, calls alternate between the two sides: ``qkv.load(run).generate_ids(prompts,
max_new_tokens=N, temperature=0)`` and ``model.generate(input_ids, attention_mask=..., max_new_tokens=N,
min_new_tokens=N, do_sample=False)`` on the same left-padded prompts, for each batch size; each call has prompts
of other lengths (all in one of qkv's shape buckets), and EOS is off on both sides, so each produces exactly N
tokens per row. Every call is timed whole (prefill, N tokens, results back as Python lists): the first call of a
batch size (qkv compiles there) is reported apart from the steady calls after it, whose median is the figure.
The greedy tokens of the two sides are compared row by row, and qkv's compilations are counted per call.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from qkv.errors import UserError

HELP = "qkv's greedy generate_ids against transformers' generate on the same exported model: tokens/s per call"


def add_generate_benchmark_parser(bench_sub: Any) -> None:
    """``qkv benchmark generate`` beside ``qkv benchmark train|decode|data``."""
    t = bench_sub.add_parser("generate", help=HELP)
    t.add_argument("args", nargs="*", help="[CONFIG] [section.key=value ...] (random parameters)")
    t.add_argument("--checkpoint", help="a run directory (default: random parameters of CONFIG)")
    t.add_argument("--against", choices=["transformers"], default="transformers", help="the reference (default)")
    t.add_argument("--arch", default="qwen3", help="the Hugging Face family to export to (qkv convert export --arch; "
                   "default qwen3, the shape of the tiny preset)")
    t.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa", help="transformers' attention (default sdpa)")
    t.add_argument("--batch-sizes", default="1,8")
    t.add_argument("--new-tokens", type=int, default=64, help="new tokens per row, exactly (EOS off on both sides)")
    t.add_argument("--prompt-len", type=int, default=48, help="the longest prompt; each call's longest is in "
                   "(its bucket's lower end, this], rows of a batch are up to 16 tokens shorter")
    t.add_argument("--calls", type=int, default=6, help="calls per batch size and side, the first one included")
    t.add_argument("--json", help="write the records to this JSON file")
    t.set_defaults(func=main)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def prompt_rows(call: int, batch: int, longest: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Prompts for one call: the longest of them between the shortest length of ``longest``'s bucket and
    ``longest``, different from call to call; the other rows of a batch up to 16 tokens shorter."""
    from qkv.inference.decode import bucket

    shortest = longest
    while shortest > 1 and bucket(shortest - 1) == bucket(longest):
        shortest -= 1
    rng = np.random.default_rng([seed, call, batch])
    top = longest - (call * 5) % (longest - shortest + 1)
    lengths = [top] + [int(rng.integers(max(1, top - 16), top + 1)) for _ in range(batch - 1)]
    low = 3 if vocab > 8 else 0  # clear of the usual special ids (pad, bos, eos)
    return [rng.integers(low, vocab, n).tolist() for n in lengths]


def _random_run(source: str | None, overrides: Sequence[str], folder: Path) -> Path:
    """Random parameters of the config as a params-only checkpoint: what ``qkv convert export`` reads."""
    import jax

    from qkv.model import create_model, split_params
    from qkv.train import checkpoint
    from qkv.train.config import load_config

    cfg = load_config(source, overrides)
    if cfg.model.kind != "decoder":
        raise UserError(f"model.kind={cfg.model.kind!r}: the generate benchmark needs a decoder-only model")
    _, params = split_params(create_model(cfg.model, cfg.train.seed))
    run = folder / "run"
    checkpoint.save_params(run, jax.tree.map(np.asarray, params), {"config": cfg.to_dict(), "step": 0})
    return run


class _Compiles:
    """Counts XLA compilations (of any program) while it is entered."""

    def __init__(self) -> None:
        self.count = 0

    def _listen(self, event: str, duration: float, **_: Any) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1

    def __enter__(self) -> "_Compiles":
        from jax import monitoring
        monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc: Any) -> None:
        from jax import monitoring
        monitoring.unregister_event_duration_listener(self._listen)


def agreement(ours: Sequence[Sequence[int]], theirs: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Rows equal, and tokens equal before each row's first difference, of two sides' greedy tokens."""
    same_prefix = []
    for a, b in zip(ours, theirs):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        same_prefix.append(n)
    total = sum(len(b) for b in theirs)
    return {"rows_equal": sum(list(a) == list(b) for a, b in zip(ours, theirs)), "rows": len(theirs),
            "tokens_before_first_difference": sum(same_prefix), "tokens": total}


def run_generate_benchmark(run_dir: Path, hf_dir: Path, batch_sizes: Sequence[int], new_tokens: int,
                           prompt_len: int, calls: int, attn: str) -> dict[str, Any]:
    """Interleaved calls of both sides; one record per (batch size, call), both sides' tokens/s and agreement."""
    import torch
    import transformers

    import qkv

    lm = qkv.load(run_dir)
    lm.stop_ids = []  # EOS off: exactly new_tokens per row, as min_new_tokens asks of transformers
    cfg = lm.config.model
    if prompt_len + new_tokens > cfg.max_seq_len:
        raise UserError(f"--prompt-len {prompt_len} + --new-tokens {new_tokens} exceed model.max_seq_len="
                        f"{cfg.max_seq_len}: shorten them")
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(threads)  # the cores XLA:CPU's thread pool uses
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                           attn_implementation=attn).eval()
    pad = lm.tokenizer.pad_id if lm.tokenizer is not None else 0
    gen = transformers.GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                        pad_token_id=pad, eos_token_id=None, bos_token_id=None)

    def ours(prompts):
        return lm.generate_ids(prompts, max_new_tokens=new_tokens, temperature=0.0)

    def theirs(prompts):
        longest = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), longest), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, longest - len(p):] = torch.tensor(p)
            mask[i, longest - len(p):] = 1
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=mask, generation_config=gen)
        return out[:, longest:].tolist()

    records = []
    for call in range(calls):
        for b in batch_sizes:
            prompts = prompt_rows(call, b, prompt_len, cfg.vocab_size)
            sides = [("qkv", ours), ("transformers", theirs)]
            if call % 2:
                sides.reverse()  # neither side always runs right after the other
            rec: dict[str, Any] = {"batch_size": b, "call": call, "prompt_lengths": [len(p) for p in prompts]}
            tokens = {}
            for name, fn in sides:
                with _Compiles() as compiles:
                    start = time.perf_counter()
                    tokens[name] = fn(prompts)
                    seconds = time.perf_counter() - start
                rec[name] = {"seconds": seconds, "tokens_per_s": b * new_tokens / seconds}
                if name == "qkv":
                    rec[name]["compiles"] = compiles.count
                if any(len(r) != new_tokens for r in tokens[name]):
                    raise RuntimeError(f"{name} produced {[len(r) for r in tokens[name]]} tokens, not {new_tokens}")
            rec["agreement"] = agreement(tokens["qkv"], tokens["transformers"])
            rec["ratio"] = rec["qkv"]["tokens_per_s"] / rec["transformers"]["tokens_per_s"]
            records.append(rec)
            print(f"batch {b} call {call}: qkv {rec['qkv']['tokens_per_s']:.0f} tok/s, transformers "
                  f"{rec['transformers']['tokens_per_s']:.0f} tok/s", file=sys.stderr, flush=True)
    return {"model": dataclasses.asdict(cfg), "params": sum(p.numel() for p in hf.parameters()),
            "hf_class": type(hf).__name__, "attn_implementation": attn, "torch_threads": torch.get_num_threads(),
            "torch_version": torch.__version__, "transformers_version": transformers.__version__,
            "cpu_model": _cpu_model(), "new_tokens": new_tokens, "calls": records,
            "summary": summarize(records, batch_sizes)}


def summarize(records: Sequence[dict[str, Any]], batch_sizes: Sequence[int]) -> list[dict[str, Any]]:
    """Per batch size: the first call, the median of the steady calls after it, and the agreement overall."""
    out = []
    for b in batch_sizes:
        recs = [r for r in records if r["batch_size"] == b]
        first, steady = recs[0], recs[1:] or recs[:1]
        med = {side: float(np.median([r[side]["tokens_per_s"] for r in steady])) for side in ("qkv", "transformers")}
        out.append({"batch_size": b,
                     "first_call": {"qkv_tokens_per_s": first["qkv"]["tokens_per_s"],
                                    "transformers_tokens_per_s": first["transformers"]["tokens_per_s"],
                                    "ratio": first["ratio"]},
                     "steady": {"calls": len(steady), "qkv_tokens_per_s": med["qkv"],
                                "transformers_tokens_per_s": med["transformers"], "ratio": med["qkv"] / med["transformers"],
                                "ratio_median_of_calls": float(np.median([r["ratio"] for r in steady])),
                                "qkv_compiles": sum(r["qkv"]["compiles"] for r in steady)},
                     "rows_equal": sum(r["agreement"]["rows_equal"] for r in recs),
                     "rows": sum(r["agreement"]["rows"] for r in recs),
                     "tokens_before_first_difference": sum(r["agreement"]["tokens_before_first_difference"] for r in recs),
                     "tokens": sum(r["agreement"]["tokens"] for r in recs)})
    return out


def table(summary: Sequence[dict[str, Any]]) -> str:
    """The summary as a Markdown table (docs/decoding-benchmarks.md shows it as printed)."""
    rows = [("batch", "call", "qkv tok/s", "transformers tok/s", "qkv / transformers", "qkv compiles", "rows equal")]
    for s in summary:
        f, st = s["first_call"], s["steady"]
        rows.append((str(s["batch_size"]), "first", f"{f['qkv_tokens_per_s']:.0f}",
                     f"{f['transformers_tokens_per_s']:.0f}", f"{f['ratio']:.2f}x", "", ""))
        rows.append((str(s["batch_size"]), f"steady (median of {st['calls']})", f"{st['qkv_tokens_per_s']:.0f}",
                     f"{st['transformers_tokens_per_s']:.0f}", f"{st['ratio']:.2f}x", str(st["qkv_compiles"]),
                     f"{s['rows_equal']}/{s['rows']}"))
    return "\n".join("| " + " | ".join(r) + " |" for r in [rows[0], ("---",) * len(rows[0]), *rows[1:]])


def main(ns: argparse.Namespace) -> int:
    from qkv.tools.benchmark import environment, parse_int_list
    from qkv.tools.convert import export_hf
    from qkv.train.config import split_config_args

    source, overrides = split_config_args(ns.args)
    if ns.checkpoint and (source or overrides):
        raise UserError("give either CONFIG [key=value ...] or --checkpoint RUN_DIR, not both")
    if ns.checkpoint and not Path(ns.checkpoint).expanduser().is_dir():
        raise FileNotFoundError(f"checkpoint directory {ns.checkpoint!r} does not exist: pass the train.run_dir of a run")
    batch_sizes = parse_int_list(ns.batch_sizes, "--batch-sizes")
    if ns.new_tokens < 1 or ns.prompt_len < 1 or ns.calls < 1:
        raise UserError(f"--new-tokens={ns.new_tokens}, --prompt-len={ns.prompt_len} and --calls={ns.calls} must "
                        "be >= 1")
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise UserError("the transformers side needs torch and transformers: pip install 'qkv[test]'") from None
    with tempfile.TemporaryDirectory(prefix="qkv-generate-bench-") as tmp:
        run_dir = Path(ns.checkpoint).expanduser() if ns.checkpoint else _random_run(source, overrides, Path(tmp))
        export_hf(run_dir, Path(tmp) / "hf", ns.arch)
        result = run_generate_benchmark(run_dir, Path(tmp) / "hf", batch_sizes, ns.new_tokens, ns.prompt_len,
                                        ns.calls, ns.attn)
    env = environment()
    env["versions"].update(torch=result.pop("torch_version"), transformers=result.pop("transformers_version"))
    record = {"benchmark": "generate", **env, "against": ns.against,
              "origin": f"checkpoint {ns.checkpoint}" if ns.checkpoint else "random parameters", **result}
    print(f"{record['hf_class']} ({record['attn_implementation']} attention), {record['params'] / 1e6:.2f}M parameters, "
          f"float32, {ns.new_tokens} new tokens per row, greedy; torch threads {record['torch_threads']}")
    print(table(record["summary"]))
    print(f"{record['cpu_model']}, {record['machine']['cpu_count']} CPUs, jax {record['versions']['jax']}, torch "
          f"{record['versions']['torch']}, transformers {record['versions']['transformers']}, {record['date']}, "
          f"load {record['machine']['load_average_1m']}")
    if ns.json:
        Path(ns.json).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.json).write_text(json.dumps({"records": [record]}, indent=1, default=str) + "\n")
        print(f"wrote {ns.json}")
    return 0
