"""``pretrain`` and ``evaluate``: the training loop around the compiled step.

A run directory holds everything: ``config.yaml``, ``tokenizer.model``, ``metrics.jsonl``,
``tensorboard/`` and ``checkpoints/``. Running ``pretrain`` again on the same directory resumes from
the newest complete checkpoint with the same data order, so the losses continue exactly.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Iterator

import jax
import numpy as np
import yaml

from qkv.data import (Tokenizer, iterator_state_from_json, iterator_state_to_json, make_eval_dataset,
                      make_lm_dataset, open_text_source, train_tokenizer)
from qkv.model.decode import Decoder, SamplingConfig

from . import checkpoint
from .config import Config, config_from_dict
from .distributed import maybe_initialize
from .metrics import MetricsWriter, flops_per_token
from .sharding import check_batch, make_mesh, resolve_rules
from .step import Trainer


def is_main_process() -> bool:
    return jax.process_index() == 0


def log(message: str) -> None:
    if is_main_process():
        print(message, flush=True)


def open_split(cfg: Config, split: str):
    d = cfg.data
    return open_text_source(d.source, d.path, split, Path(d.data_dir).expanduser(), text_field=d.text_field,
                            tfds_name=d.tfds_name, validation_fraction=d.validation_fraction)


def prepare_tokenizer(cfg: Config, run_dir: Path, train_source) -> Tokenizer:
    """The configured tokenizer, or one trained on a seeded sample of the training split."""
    if cfg.tokenizer.path:
        path = Path(cfg.tokenizer.path).expanduser()
        if not path.is_file():
            raise ValueError(f"tokenizer.path={cfg.tokenizer.path!r} does not exist: point it at a .model file "
                             "or leave it unset to train one")
        return Tokenizer.load(path)
    target = run_dir / "tokenizer.model"
    if not target.exists():
        if is_main_process():
            rng = np.random.default_rng(cfg.train.seed)
            n = min(cfg.tokenizer.train_documents, len(train_source))
            picks = sorted(rng.choice(len(train_source), size=n, replace=False).tolist())
            texts = train_source.__getitems__(picks)
            started = time.time()
            train_tokenizer(texts, run_dir / "tokenizer", vocab_size=cfg.model.vocab_size,
                            model_type=cfg.tokenizer.model_type, seed=cfg.train.seed)
            log(f"trained a {cfg.tokenizer.model_type} tokenizer on {n} documents in {time.time() - started:.1f}s")
        _sync("tokenizer")
    return Tokenizer.load(target)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _check_resumable(cfg: Config, meta: dict[str, Any], run_dir: Path) -> None:
    saved = config_from_dict(meta["config"])
    for section in ("model", "data"):
        old, new = getattr(saved, section), getattr(cfg, section)
        if old != new:
            changed = [k for k in old.__dataclass_fields__ if getattr(old, k) != getattr(new, k)]
            key = changed[0]
            raise ValueError(
                f"{run_dir} holds a run with {section}.{key}={getattr(old, key)!r}, not {getattr(new, key)!r}: "
                "use another train.run_dir or keep the saved settings"
            )


def build_trainer(cfg: Config) -> Trainer:
    mesh = make_mesh(cfg.mesh)
    rules = resolve_rules(cfg.mesh.rules)
    check_batch(cfg.train.batch_size, mesh, rules)
    if cfg.train.batch_size % jax.process_count():
        raise ValueError(f"train.batch_size={cfg.train.batch_size} must divide over {jax.process_count()} processes")
    return Trainer(cfg.model, cfg.optim, mesh, rules, cfg.train.steps, cfg.train.seed)


def _eval_batches(cfg: Config, source, tok: Tokenizer) -> Iterator[dict[str, np.ndarray]]:
    """A fixed number of validation batches per process, padding with empty batches when a shard ends
    early, so every process runs the same number of compiled steps."""
    per_process = cfg.train.batch_size // jax.process_count()
    ds = make_eval_dataset(source, tok.encode, seq_len=cfg.data.seq_len, batch_size=per_process,
                           bos_id=tok.bos_id, eos_id=tok.eos_id, shard_index=jax.process_index(),
                           shard_count=jax.process_count())
    it = iter(ds)
    first = next(it)
    yield first
    empty = {k: np.zeros_like(v) for k, v in first.items()}
    count = 1
    limit = cfg.data.eval_batches or math.inf
    while count < limit:
        batch = next(it, None)
        if batch is None and not cfg.data.eval_batches:
            return
        yield empty if batch is None else batch
        count += 1


def run_eval(trainer: Trainer, params: Any, cfg: Config, source, tok: Tokenizer) -> dict[str, float]:
    loss_sum, tokens = 0.0, 0.0
    for batch in _eval_batches(cfg, source, tok):
        out = jax.device_get(trainer.eval_step(params, trainer.put_batch(batch)))
        loss_sum, tokens = loss_sum + float(out["loss_sum"]), tokens + float(out["tokens"])
    loss = loss_sum / max(tokens, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens}


def sample_text(trainer: Trainer, params: Any, tok: Tokenizer, prompt: str, max_new_tokens: int,
                seed: int = 0) -> str:
    decoder = Decoder(trainer.model_cfg, trainer.graphdef,
                      SamplingConfig(temperature=0.7, top_k=40, max_new_tokens=max_new_tokens, seed=seed))
    ids = decoder.generate(params, [[tok.bos_id] + tok.encode(prompt)], tok.pad_id, tok.eos_id)[0]
    return prompt + tok.decode(ids)


def pretrain(cfg: Config) -> dict[str, Any]:
    """Train (or resume) the run in ``cfg.train.run_dir``; returns a summary of the final state."""
    maybe_initialize(cfg.train.distributed)
    run_dir = Path(cfg.train.run_dir).expanduser().resolve()
    train_source, val_source = open_split(cfg, "train"), open_split(cfg, "validation")

    resume_step = checkpoint.latest_step(run_dir)
    meta = checkpoint.read_meta(run_dir, resume_step) if resume_step is not None else None
    if meta is not None:
        _check_resumable(cfg, meta, run_dir)
        tok = Tokenizer.from_bytes(checkpoint.decode_tokenizer(meta["tokenizer"]))
    else:
        if is_main_process():
            run_dir.mkdir(parents=True, exist_ok=True)
        tok = prepare_tokenizer(cfg, run_dir, train_source)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} pieces but model.vocab_size={cfg.model.vocab_size}: "
                         f"set model.vocab_size={tok.vocab_size} or use a smaller tokenizer")
    if is_main_process():
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    trainer = build_trainer(cfg)
    per_process = cfg.train.batch_size // jax.process_count()
    data_iter = iter(make_lm_dataset(train_source, tok.encode, seq_len=cfg.data.seq_len, batch_size=per_process,
                                     seed=cfg.train.seed, shard_index=jax.process_index(),
                                     shard_count=jax.process_count(), bos_id=tok.bos_id, eos_id=tok.eos_id))
    if meta is not None:
        state, _ = checkpoint.restore(run_dir, trainer.abstract_state, resume_step)
        state["step"] = jax.device_put(np.int32(state["step"]), trainer.state_shardings["step"])
        data_iter.set_state(iterator_state_from_json(meta["data"]))
        log(f"resumed {run_dir} at step {resume_step}")
    else:
        state = trainer.init_state()

    from qkv.model import count_params
    n_params = count_params(state["params"])
    log(f"model: {n_params / 1e6:.2f}M parameters; mesh {dict(trainer.mesh.shape)}; "
        f"{jax.device_count()} {jax.devices()[0].platform} devices; vocab {tok.vocab_size}")

    writer = MetricsWriter(run_dir)
    mngr = checkpoint.manager(run_dir, cfg.train.keep_checkpoints)

    def meta_now() -> dict[str, Any]:
        return {"config": cfg.to_dict(), "data": iterator_state_to_json(data_iter.get_state()),
                "tokenizer": checkpoint.encode_tokenizer(tok.to_bytes())}

    start = int(jax.device_get(state["step"]))
    flops_per_step = flops_per_token(cfg.model, cfg.data.seq_len) * cfg.train.batch_size * cfg.data.seq_len
    end = min(cfg.train.stop_at_step or cfg.train.steps, cfg.train.steps)
    bar = _progress(cfg, start)
    pending: list[dict[str, jax.Array]] = []
    window_start, last, ev = time.time(), {}, None
    for step in range(start, end):
        state, metrics = trainer.train_step(state, trainer.put_batch(next(data_iter)))
        pending.append(metrics)
        done = step + 1
        if done % cfg.train.log_every == 0 or done == end:
            host = jax.device_get(pending)  # the only host sync in the loop
            elapsed = time.time() - window_start
            tokens = sum(float(m["tokens"]) for m in host)
            last = {"loss": float(np.mean([m["loss"] for m in host])), "lr": float(host[-1]["lr"]),
                    "grad_norm": float(host[-1]["grad_norm"]), "tokens_per_s": tokens / elapsed,
                    "tflops_per_device": flops_per_step * len(host) / elapsed / jax.device_count() / 1e12}
            writer.write(done, last)
            pending, window_start = [], time.time()
            if bar is not None:
                bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_s']:.0f}")
        if bar is not None:
            bar.update(1)
        if done % cfg.train.eval_every == 0 or done == end:
            ev = run_eval(trainer, state["params"], cfg, val_source, tok)
            writer.write(done, ev, prefix="eval")
            _bar_write(bar, f"step {done}: train loss {last.get('loss', float('nan')):.4f}, "
                            f"val loss {ev['loss']:.4f}, val ppl {ev['perplexity']:.2f}")
            window_start = time.time()  # evaluation time is not training throughput
        if done % cfg.train.checkpoint_every == 0 or done == end:
            checkpoint.save(mngr, state, meta_now())
    if bar is not None:
        bar.close()
    mngr.wait_until_finished()
    mngr.close()
    writer.close()

    summary: dict[str, Any] = {"step": int(jax.device_get(state["step"])), "params": n_params,
                               "run_dir": str(run_dir), **{f"train_{k}": v for k, v in last.items()}}
    ev = ev or run_eval(trainer, state["params"], cfg, val_source, tok)  # the loop's last step always evaluates
    summary.update(val_loss=ev["loss"], val_perplexity=ev["perplexity"])
    if cfg.train.sample_tokens > 0:
        summary["sample"] = sample_text(trainer, state["params"], tok, cfg.train.sample_prompt, cfg.train.sample_tokens)
        log("sample:\n" + summary["sample"])
    return summary


def _progress(cfg: Config, start: int):
    if not (cfg.train.progress and is_main_process()):
        return None
    from tqdm import tqdm
    return tqdm(total=cfg.train.steps, initial=start, desc="pretrain", unit="step", dynamic_ncols=True)


def _bar_write(bar, message: str) -> None:
    if bar is not None:
        bar.write(message)
    else:
        log(message)


def evaluate(run_dir: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, float]:
    """Validation loss and perplexity of the newest checkpoint in ``run_dir``."""
    meta = checkpoint.read_meta(run_dir)
    data = meta["config"]
    for section, values in (overrides or {}).items():
        data.setdefault(section, {}).update(values)
    cfg = config_from_dict(data)
    maybe_initialize(cfg.train.distributed)
    trainer = build_trainer(cfg)
    state, meta = checkpoint.restore(run_dir, trainer.abstract_state, with_optimizer=False)
    tok = Tokenizer.from_bytes(checkpoint.decode_tokenizer(meta["tokenizer"]))
    result = run_eval(trainer, state["params"], cfg, open_split(cfg, "validation"), tok)
    return {"step": meta["step"], **result}
