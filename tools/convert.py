"""``qkv convert``: Hugging Face safetensors checkpoints ⇄ qkv Orbax checkpoints.

Reading uses safetensors' NumPy API (no torch, and never pickle: ``.bin`` files are refused).
Import writes a run directory whose step-0 checkpoint holds ``params`` and ``meta`` (config and,
when the HF directory has a SentencePiece ``tokenizer.model``, the tokenizer), loadable by
``qkv generate`` / ``qkv.load``. Export writes ``config.json`` + ``model.safetensors`` that
``transformers`` loads; both are written to a temporary directory and renamed when complete.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

from qkv.inference.run import load_run
from qkv.model import abstract_model, split_params
from qkv.model.hf import ARCHITECTURES, architecture_of

from qkv.train import checkpoint
from qkv.train.config import Config, DataConfig, config_from_dict
from qkv.train.lora import lora_paths


def read_safetensors(hf_dir: Path) -> dict[str, np.ndarray]:
    """Every tensor of a (possibly sharded) safetensors checkpoint, as NumPy arrays."""
    from safetensors.numpy import load_file

    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in hf_dir.glob("*.bin"))
        hint = f" ({', '.join(pickled)} are pickle files, which qkv never loads)" if pickled else ""
        raise FileNotFoundError(f"no .safetensors files in {hf_dir}{hint}: save the model with "
                                "save_pretrained(..., safe_serialization=True)")
    tensors: dict[str, np.ndarray] = {}
    for path in files:
        tensors.update(load_file(str(path)))
    return tensors


def _first_mismatch(expected: Any, got: Any) -> str | None:
    got_flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(got)[0]}
    for path, want in jax.tree_util.tree_flatten_with_path(expected)[0]:
        key = jax.tree_util.keystr(path)
        if key not in got_flat:
            return f"{key} is missing"
        if tuple(got_flat[key].shape) != tuple(want.shape):
            return f"{key} has shape {tuple(got_flat[key].shape)}, the config implies {tuple(want.shape)}"
    return None


def import_hf(hf_dir: str | Path, run_dir: str | Path, tokenizer: str | Path | None = None) -> dict[str, Any]:
    """Convert a Llama/GPT-2 HF directory into a qkv run directory; returns a short summary."""
    hf_dir, run_dir = Path(hf_dir).expanduser(), Path(run_dir).expanduser()
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} does not exist: pass a Hugging Face model directory")
    if checkpoint.latest_step(run_dir) is not None:
        raise ValueError(f"{run_dir} already holds a checkpoint: choose a new output directory")
    hf_config = json.loads(config_path.read_text())
    arch = architecture_of(hf_config)
    model_cfg = arch.config_from_hf(hf_config)
    tensors = read_safetensors(hf_dir)
    try:
        params = arch.params_from_hf(tensors, model_cfg)
    except KeyError as err:
        raise ValueError(f"{hf_dir} lacks tensor {err.args[0]!r} that {arch.hf_name} needs") from None
    params = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
    problem = _first_mismatch(split_params(abstract_model(model_cfg))[1], params)
    if problem:
        raise ValueError(f"{hf_dir} does not match its config.json: {problem}")
    tok_path = Path(tokenizer).expanduser() if tokenizer else hf_dir / "tokenizer.model"
    if tokenizer and not tok_path.is_file():
        raise FileNotFoundError(f"tokenizer {tokenizer!r} does not exist: pass a SentencePiece .model file")
    cfg = Config(model=model_cfg, data=DataConfig(seq_len=min(DataConfig.seq_len, model_cfg.max_seq_len)))
    meta: dict[str, Any] = {"config": cfg.to_dict(), "step": 0, "source": {"hf_dir": str(hf_dir), "arch": arch.hf_name}}
    if tok_path.is_file():
        meta["tokenizer"] = checkpoint.encode_tokenizer(tok_path.read_bytes())
    checkpoint.save_params(run_dir, params, meta, step=0)
    return {"run_dir": str(run_dir.resolve()), "arch": arch.hf_name, "tokenizer": "tokenizer" in meta,
            "params": int(sum(a.size for a in jax.tree.leaves(params)))}


def load_params(run_dir: str | Path, step: int | None = None) -> tuple[Config, dict[str, Any], dict[str, Any]]:
    """(config, params as NumPy, meta) of a checkpoint, restored on one host (a LoRA run merged)."""
    run = load_run(run_dir, step)
    return run.config, jax.tree.map(np.asarray, jax.device_get(run.params)), run.meta


def export_hf(run_dir: str | Path, out_dir: str | Path, arch_name: str, step: int | None = None) -> dict[str, Any]:
    """Write ``config.json`` + ``model.safetensors`` (float32) that ``transformers`` loads."""
    from safetensors.numpy import save_file

    if arch_name not in ARCHITECTURES:
        raise ValueError(f"--arch {arch_name!r} is not supported: choose {', '.join(ARCHITECTURES)}")
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} exists and is not empty: choose a new output directory")
    arch = ARCHITECTURES[arch_name]
    cfg, params, meta = load_params(run_dir, step)
    arch.check(cfg.model)
    tensors = arch.params_to_hf(params, cfg.model)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".qkv-export-", dir=out_dir.parent))
    try:
        save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(arch.config_to_hf(cfg.model), indent=2))
        if "tokenizer" in meta:
            (tmp / "tokenizer.model").write_bytes(checkpoint.decode_tokenizer(meta["tokenizer"]))
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"out_dir": str(out_dir.resolve()), "arch": arch.hf_name, "tensors": len(tensors), "step": meta["step"]}


def merge_lora_run(run_dir: str | Path, out_dir: str | Path, step: int | None = None) -> dict[str, Any]:
    """``qkv convert merge-lora``: a LoRA run (base + adapters) -> a plain params checkpoint in out_dir."""
    run_dir, out_dir = Path(run_dir).expanduser().resolve(), Path(out_dir).expanduser().resolve()
    if checkpoint.latest_step(out_dir) is not None:
        raise ValueError(f"{out_dir} already holds a checkpoint: choose a new output directory")
    cfg = config_from_dict(checkpoint.read_meta(run_dir, step)["config"])
    if cfg.finetune.lora.rank == 0:
        raise ValueError(f"{run_dir} is not a LoRA run (finetune.lora.rank=0): it is already a plain checkpoint")
    run = load_run(run_dir, step)  # base + adapters, merged
    plain = dataclasses.replace(cfg, finetune=dataclasses.replace(
        cfg.finetune, lora=dataclasses.replace(cfg.finetune.lora, rank=0)))
    checkpoint.save_params(out_dir, run.params, {"config": plain.to_dict(), "tokenizer": run.meta["tokenizer"],
                                                 "source": {"merged_lora_run": str(run_dir), "step": run.step}},
                           step=run.step)
    return {"out_dir": str(out_dir), "step": run.step, "base": cfg.finetune.init_from,
            "adapted": [".".join(p) for p in lora_paths(run.params, cfg.finetune.lora.targets)]}
