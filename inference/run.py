"""A trained run, loaded once for inference: its config, tokenizer, model graph and parameters.

Every reader of a run directory — the public API (``qkv.load``), ``qkv generate``/``embed``/
``explain``, export to Hugging Face, benchmarks of a checkpoint — goes through ``load_run``:
parameters only (no optimizer state), restored replicated on the local devices, LoRA runs merged
with their base model.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flax import nnx

from qkv.data import Tokenizer
from qkv.data.tokenizer import check_vocab
from qkv.train import checkpoint
from qkv.train.config import Config, MeshConfig, config_from_dict
from qkv.train.finetune import load_lora_params
from qkv.train.sharding import make_mesh, resolve_rules
from qkv.train.step import abstract_params


@dataclass
class Run:
    config: Config
    tokenizer: Tokenizer | None  # None for converted checkpoints that came without a tokenizer
    graphdef: nnx.GraphDef
    params: Any
    step: int
    meta: dict[str, Any]


def load_run(run_dir: str | Path, step: int | None = None) -> Run:
    """The checkpoint at ``step`` (default: the newest) of ``run_dir``, ready to run."""
    if not Path(run_dir).expanduser().exists():
        raise FileNotFoundError(f"checkpoint directory {run_dir!r} does not exist: pass a run directory "
                                "written by qkv pretrain, qkv finetune or qkv convert import")
    meta = checkpoint.read_meta(run_dir, step)
    cfg = config_from_dict(meta["config"])
    mesh = make_mesh(MeshConfig())  # all local devices on the data axis: parameters replicated
    graphdef, params, _ = abstract_params(cfg.model, mesh, resolve_rules(cfg.mesh.rules))
    if cfg.finetune.lora.rank > 0:  # a LoRA run: its base model (finetune.init_from) + adapters, merged
        params = load_lora_params(run_dir, meta, params)
    else:
        params = checkpoint.restore(run_dir, {"params": params}, meta["step"], with_optimizer=False)[0]["params"]
    tok = checkpoint.read_tokenizer(meta)
    if tok is not None:
        check_vocab(tok, cfg.model.vocab_size)  # ids the model has no rows for would decode silently wrong
    return Run(cfg, tok, graphdef, params, int(meta["step"]), meta)
