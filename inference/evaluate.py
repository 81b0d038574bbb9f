"""``qkv evaluate``: loss, perplexity and accuracy of a run's newest checkpoint on a split, with the
training side's own evaluation loop (``qkv.train.step.run_eval``), plus BLEU for encoder-decoders."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from qkv.train import checkpoint
from qkv.train.config import Config, config_from_dict
from qkv.train.distributed import maybe_initialize
from qkv.train.finetune import finetune_eval_batches, finetune_trainer, load_examples
from qkv.train.loop import build_trainer
from qkv.train.step import run_eval
from qkv.train.tasks import task_for

from .report import split_scores


def evaluate(run_dir: str | Path, overrides: dict[str, Any] | None = None, split: str = "validation",
             bleu: bool = True, beam_size: int = 1) -> dict[str, Any]:
    """Loss, perplexity and accuracy of the newest checkpoint in ``run_dir`` on ``split``; for an
    encoder-decoder also corpus BLEU of its greedy (or beam) translations of that split."""
    meta = checkpoint.read_meta(run_dir)
    data = meta["config"]
    for section, values in (overrides or {}).items():
        data.setdefault(section, {}).update(values)
    cfg = config_from_dict(data)
    maybe_initialize(cfg.train.distributed)
    if cfg.finetune.method == "classify":
        return evaluate_classifier(run_dir, cfg, split)
    trainer = build_trainer(cfg)
    state, meta = checkpoint.restore(run_dir, trainer.abstract_state, with_optimizer=False)
    tok = checkpoint.read_tokenizer(meta)
    task = task_for(cfg)
    source = task.open(split)
    result = run_eval(trainer, state["params"], task.eval_batches(tok, source))
    if bleu:
        result.update(split_scores(cfg, trainer.graphdef, state["params"], tok, source, beam_size))
    return {"step": meta["step"], "split": split, **result}


def evaluate_classifier(run_dir: str | Path, cfg: Config, split: str = "validation") -> dict[str, Any]:
    """``qkv evaluate`` of a classifier run: loss and accuracy on finetune.eval_path (or the TFDS split)."""
    trainer = finetune_trainer(cfg)
    state, meta = checkpoint.restore(run_dir, trainer.abstract_state, with_optimizer=False)
    tok = checkpoint.read_tokenizer(meta)
    path = cfg.finetune.eval_path or (None if cfg.data.source == "tfds" else cfg.finetune.train_path)
    loaded = load_examples(cfg, tok, path, split)
    result = run_eval(trainer, state["params"], finetune_eval_batches(cfg, loaded.items, max_batches=0))
    return {"step": meta["step"], "split": split, "labels": cfg.finetune.labels, **result,
            "truncated": loaded.truncated}
