"""`qkv data prepare CONFIG --out DIR`, `qkv data inspect CONFIG` and `qkv benchmark data CONFIG`: look at streamed sources before training, and
time the whole input path (read + tokenize + pack + batch) on this host.

inspect prints, per source: kind, shards, documents (counted in up to ``--count-shards`` shards, scaled to
all of them when there are more, and marked as an estimate), tokens per document over a sample, a decoded
sample, and the effective mixture (weights normalized). benchmark runs the training iterator of CONFIG
(``--workers N``: N processes, each reading its own shards as N data processes would) and reports tokens/s.
"""
from __future__ import annotations

import json
import multiprocessing
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from qkv.data import MixtureIterator, RowStream, Tokenizer, read_rows, train_tokenizer
from qkv.errors import UserError
from qkv.train.config import Config, load_config, split_config_args
from qkv.train.tasks import LMTask


def _task(cfg: Config) -> LMTask:
    if not cfg.data.streamed:
        raise UserError(f"data.source={cfg.data.source} is not streamed: inspect and benchmark data take "
                        "data.source=parquet|hf, compressed or data.stream=true jsonl, or a data.mixture")
    return LMTask(cfg)


def _tokenizer(cfg: Config, task: LMTask, sources, workdir: Path) -> Tokenizer:
    if cfg.tokenizer.path:
        return Tokenizer.load(Path(cfg.tokenizer.path).expanduser())
    saved = Path(cfg.train.run_dir).expanduser() / "tokenizer.model"
    if saved.is_file():
        return Tokenizer.load(saved)
    texts = task.texts(sources)
    return Tokenizer.load(train_tokenizer(list(texts), workdir / "tok", vocab_size=cfg.model.vocab_size,
                                          model_type=cfg.tokenizer.model_type, seed=cfg.train.seed))


def inspect(cfg: Config, count_shards: int = 4, sample: int = 200) -> dict[str, Any]:
    task = _task(cfg)
    sources = task.open("train")
    with tempfile.TemporaryDirectory() as tmp:
        tok = _tokenizer(cfg, task, sources, Path(tmp))
        shares = MixtureIterator.shares(sources)
        out = []
        for source, share in zip(sources, shares):
            counted = source.shards[:count_shards]
            rows = sum(sum(1 for _ in read_rows(s)) for s in counted)
            docs = rows * len(source.shards) / max(len(counted), 1)
            lengths, first = [], None
            for shard in source.shards:
                for r in read_rows(shard):
                    ids = r.doc if isinstance(r.doc, list) else tok.encode(r.doc)
                    lengths.append(len(ids))
                    first = first if first is not None else ids
                    if len(lengths) >= sample:
                        break
                if len(lengths) >= sample:
                    break
            out.append({"name": source.name, "shards": len(source.shards), "documents": int(round(docs)),
                        "documents_estimated": len(counted) < len(source.shards),
                        "eval_shards": len(source.eval_shards),
                        "tokens_per_document": float(np.mean(lengths)) if lengths else 0.0,
                        "weight": source.weight, "share": share,
                        "sample": tok.decode(first[:64]) if first is not None else ""})
    return {"sources": out}


def inspect_text(report: dict[str, Any]) -> str:
    lines = []
    for s in report["sources"]:
        docs = f"~{s['documents']:,} (estimated)" if s["documents_estimated"] else f"{s['documents']:,}"
        lines.append(f"{s['name']}: {s['shards']} shard(s), {docs} documents, {s['tokens_per_document']:.1f} "
                     f"tokens/document, weight {s['weight']:g} -> share {s['share']:.3f}"
                     + (f", {s['eval_shards']} evaluation shard(s)" if s["eval_shards"] else ""))
        lines.append(f"  sample: {s['sample'][:160]!r}")
    lines.append("mixture: " + ", ".join(f"{s['name']} {s['share']:.1%}" for s in report["sources"]))
    return "\n".join(lines)


def prepare(cfg: Config, out: str) -> dict[str, Any]:
    """Tokenize every source's shards once into ``out/NAME`` (and ``out/NAME-eval`` for its own evaluation
    shards): one array_record file per shard, one record per row (int32 token ids; blank rows stay empty
    records so row numbers, and with them the validation split, are kept). Read back with kind ``prepared``,
    they give the batches of the source itself."""
    from array_record.python.array_record_module import ArrayRecordWriter

    from qkv.data.streams import PREPARED_MANIFEST

    if not cfg.tokenizer.path:
        raise UserError("qkv data prepare stores token ids: set tokenizer.path to the SentencePiece .model the "
                        "training run will use")
    task = _task(cfg)
    tok = Tokenizer.load(Path(cfg.tokenizer.path).expanduser())
    written = {}
    for source in task.open("train"):
        for suffix, shards in (("", source.shards), ("-eval", source.eval_shards)):
            if not shards:
                continue
            target = Path(out).expanduser() / f"{source.name}{suffix}"
            target.mkdir(parents=True, exist_ok=True)
            names, rows = [], 0
            for ordinal, shard in enumerate(shards):
                name = f"{ordinal:06d}.array_record"
                partial = target / (name + ".partial")
                writer = ArrayRecordWriter(str(partial), "group_size:1")
                for r in read_rows(shard):
                    ids = r.doc if isinstance(r.doc, list) else (tok.encode(r.doc) if r.doc.strip() else [])
                    writer.write(np.asarray(ids, np.int32).tobytes())
                    rows += 1
                writer.close()
                partial.replace(target / name)
                names.append(name)
            (target / PREPARED_MANIFEST).write_text(json.dumps({"shards": names, "source": source.name,
                                                                "rows": rows}, indent=1))
            written[f"{source.name}{suffix}"] = {"path": str(target), "shards": len(names), "rows": rows}
    return written


def _bench_worker(args: tuple[dict[str, Any], str, int, int, int]) -> tuple[int, float]:
    cfg_dict, tok_path, rank, workers, batches = args
    from qkv.train.config import config_from_dict

    cfg = config_from_dict(cfg_dict)
    task = LMTask(cfg)
    tok = Tokenizer.load(Path(tok_path))
    sources = task.open("train")
    d = cfg.data
    streams = [RowStream(s, tok.encode, split="train", seq_len=d.seq_len, seed=cfg.train.seed, bos_id=tok.bos_id,
                         eos_id=tok.eos_id, validation_fraction=d.validation_fraction, shuffle_rows=d.shuffle_rows,
                         process_index=rank, process_count=workers) for s in sources]
    it = MixtureIterator(streams, [s.weight for s in sources], cfg.train.batch_size)
    started = time.perf_counter()
    tokens = sum(int(next(it)["inputs"].size) for _ in range(batches))
    return tokens, time.perf_counter() - started


def benchmark(cfg: Config, workers: int = 1, batches: int = 20) -> dict[str, Any]:
    """tokens/s of the training input path on this host: ``workers`` processes on disjoint shards."""
    if workers < 1 or batches < 1:
        raise UserError(f"--workers={workers}, --batches={batches}: both must be >= 1")
    task = _task(cfg)
    sources = task.open("train")
    with tempfile.TemporaryDirectory() as tmp:
        tok = _tokenizer(cfg, task, sources, Path(tmp))
        tok_path = Path(tmp) / "bench.model"
        tok_path.write_bytes(tok.to_bytes())
        jobs = [(cfg.to_dict(), str(tok_path), r, workers, batches) for r in range(workers)]
        if workers == 1:
            results = [_bench_worker(jobs[0])]
        else:
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                results = pool.map(_bench_worker, jobs)
    tokens = sum(t for t, _ in results)
    seconds = max(s for _, s in results)
    return {"workers": workers, "batches_per_worker": batches, "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds, "batch_size": cfg.train.batch_size, "seq_len": cfg.data.seq_len}


def main(ns: Any) -> int:
    source, overrides = split_config_args(ns.args)
    cfg = load_config(source, overrides)
    if getattr(ns, "data_command", None) == "prepare":
        print(json.dumps(prepare(cfg, ns.out)))
        return 0
    if getattr(ns, "data_command", None) == "inspect":
        report = inspect(cfg, ns.count_shards, ns.sample)
        print(json.dumps(report, indent=1) if ns.json else inspect_text(report))
        return 0
    result = benchmark(cfg, ns.workers, ns.batches)
    print(json.dumps(result) if ns.json else
          f"input path: {result['tokens_per_s']:,.0f} tokens/s with {result['workers']} worker(s) "
          f"({result['tokens']:,} tokens in {result['seconds']:.2f}s; batch {result['batch_size']} x "
          f"{result['seq_len']})")
    return 0
