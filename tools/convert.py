"""``qkv convert``: Hugging Face safetensors checkpoints ⇄ qkv Orbax checkpoints.

Reading maps the safetensors files and converts one tensor at a time (no torch, and never pickle: ``.bin``
files are refused); every config.json field is mapped or refused by name (``qkv.model.hf``). Import writes a
run directory whose step-0 checkpoint holds ``params`` and ``meta`` (config, the source's special ids and,
when the HF directory has a ``tokenizer.json`` or SentencePiece ``tokenizer.model``, the tokenizer), loadable
by ``qkv generate`` / ``qkv.load``. Export writes ``config.json`` + ``generation_config.json`` +
``model.safetensors`` (+ the tokenizer) that ``transformers`` loads, with the run's real special ids; both are
written to a temporary directory and renamed when complete.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from pathlib import Path
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np

from qkv.data import Tokenizer
from qkv.data.tokenizer import check_vocab
from qkv.inference.run import load_run
from qkv.model import abstract_model, split_params
from qkv.model.hf import architecture_of, find_architecture

from qkv.train import checkpoint
from qkv.train.config import Config, DataConfig, config_from_dict
from qkv.train.lora import lora_paths
from qkv.errors import UserError


class SafetensorsDir(Mapping[str, np.ndarray]):
    """The tensors of a (possibly sharded) safetensors checkpoint, read one at a time on access as float32
    (``safe_open`` maps the files; no tensor is read before it is asked for), so converting never holds the
    source checkpoint and the converted one in memory together. A damaged file is named in a ValueError."""

    def __init__(self, hf_dir: Path):
        self.files = sorted(hf_dir.glob("*.safetensors"))
        if not self.files:
            pickled = sorted(p.name for p in hf_dir.glob("*.bin"))
            hint = f" ({', '.join(pickled)} are pickle files, which qkv never loads)" if pickled else ""
            raise FileNotFoundError(f"no .safetensors files in {hf_dir}{hint}: save the model with "
                                    "save_pretrained(..., safe_serialization=True)")
        self.where: dict[str, Path] = {}
        for path in self.files:
            with self._open(path) as f:
                self.where.update(dict.fromkeys(f.keys(), path))

    @staticmethod
    def _open(path: Path):
        from safetensors import safe_open  # framework="flax": NumPy has no bfloat16

        try:
            return safe_open(str(path), framework="flax")
        except Exception as err:  # SafetensorError (a header past the end, bad JSON), OSError
            raise UserError(f"{path} is not a readable safetensors file ({_first_line(err)}): it is truncated or "
                            "damaged; download or save it again") from None

    def __getitem__(self, name: str) -> np.ndarray:
        path = self.where[name]
        with self._open(path) as f:
            try:
                return np.asarray(f.get_tensor(name), np.float32)
            except Exception as err:
                raise UserError(f"{path} is damaged: tensor {name!r} cannot be read ({_first_line(err)}); "
                                "download or save it again") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def read_config(hf_dir: Path) -> dict[str, Any]:
    """config.json of a Hugging Face model directory; a missing or broken one is named in the error."""
    path = hf_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass a Hugging Face model directory")
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({_first_line(err)}): fix or download it again") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a JSON object: fix or download it again")
    return config


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
    """Convert a Hugging Face directory of a family qkv converts into a qkv run directory; returns a summary."""
    hf_dir, run_dir = Path(hf_dir).expanduser(), Path(run_dir).expanduser()
    hf_config = read_config(hf_dir)
    if checkpoint.latest_step(run_dir) is not None:
        raise UserError(f"{run_dir} already holds a checkpoint: choose a new output directory")
    arch = architecture_of(hf_config)
    try:
        model_cfg = arch.config_from_hf(hf_config)
    except KeyError as err:
        raise UserError(f"{hf_dir / 'config.json'} lacks field {err.args[0]!r}, which "
                        f"{arch.hf_name} needs") from None
    tensors = SafetensorsDir(hf_dir)
    try:
        params = arch.params_from_hf(tensors, model_cfg)
    except KeyError as err:
        raise UserError(f"{hf_dir} lacks tensor {err.args[0]!r} that {arch.hf_name} needs") from None
    problem = _first_mismatch(split_params(abstract_model(model_cfg))[1], params)
    if problem:
        raise UserError(f"{hf_dir} does not match its config.json: {problem}")
    tok = _import_tokenizer(hf_dir, tokenizer)
    if tok is not None:
        check_vocab(tok, model_cfg.vocab_size)
    cfg = Config(model=model_cfg, data=DataConfig(seq_len=min(DataConfig.seq_len, model_cfg.max_seq_len)))
    ids = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf_config.get(k) is not None}
    meta: dict[str, Any] = {"config": cfg.to_dict(), "step": 0,
                            "source": {"hf_dir": str(hf_dir), "arch": arch.hf_name, "special_ids": ids}}
    if tok is not None:
        meta["tokenizer"] = checkpoint.encode_tokenizer(tok.to_bytes())
        meta["tokenizer_backend"] = tok.backend
    meta.update(import_chat(hf_dir, tokenizer), eos_ids=eos_ids_of(hf_dir, hf_config))
    checkpoint.save_params(run_dir, params, meta, step=0)
    return {"run_dir": str(run_dir.resolve()), "arch": arch.hf_name, "tokenizer": tok.backend if tok else None,
            "params": int(sum(a.size for a in jax.tree.leaves(params)))}


def eos_ids_of(hf_dir: Path, hf_config: dict[str, Any]) -> list[int]:
    """Every id that ends generation: generation_config.json's ``eos_token_id`` (one id or a list, as Llama 3 and
    Qwen ship), else config.json's; generation stops at any of them (``qkv.load(...).stop_ids``)."""
    eos = hf_config.get("eos_token_id")
    path = hf_dir / "generation_config.json"
    if path.is_file():
        try:
            generation = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise UserError(f"{path} is not valid JSON ({_first_line(err)}): fix or download it again") from None
        if isinstance(generation, dict) and generation.get("eos_token_id") is not None:
            eos = generation["eos_token_id"]
    ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise UserError(f"eos_token_id={eos!r} in {hf_dir} is not a token id or a list of them: fix the file")
    return ids


def _import_tokenizer(hf_dir: Path, tokenizer: str | Path | None) -> Tokenizer | None:
    """The tokenizer given, else HF_DIR's tokenizer.json or tokenizer.model, else None."""
    if tokenizer:
        if not Path(tokenizer).expanduser().exists():
            raise FileNotFoundError(f"tokenizer {tokenizer!r} does not exist: pass a SentencePiece .model or a "
                                    "Hugging Face tokenizer.json")
        return Tokenizer.load(tokenizer)
    if (hf_dir / "tokenizer.json").is_file() or (hf_dir / "tokenizer.model").is_file():
        return Tokenizer.load(hf_dir)
    return None


# ---------------------------------------------------------------------------------------------
# Chat templates (docs/chat.md): read at import, written back at export


def import_chat(hf_dir: Path, tokenizer: str | Path | None) -> dict[str, Any]:
    """Meta entries for the chat: the template HF_DIR (or the --tokenizer's directory) ships (the ids that end
    generation come from ``eos_ids_of``)."""
    from qkv.data.chat_template import read_template

    out: dict[str, Any] = {}
    source = read_template(hf_dir) or (read_template(Path(tokenizer).expanduser()) if tokenizer else None)
    if source:
        out["chat_template"] = source
    return out


def export_chat(meta: dict[str, Any], tok: Tokenizer, folder: Path) -> None:
    """The run's chat template (qkv's plain one when it has none) into tokenizer_config.json and
    chat_template.jinja, so apply_chat_template of the exported tokenizer gives the ids qkv trained on."""
    from qkv.data.chat_template import stop_ids, template_for

    template = template_for(meta, tok)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    config["chat_template"] = template.source
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (folder / "chat_template.jinja").write_text(template.source, encoding="utf-8")
    stops = stop_ids(template, tok, meta.get("eos_ids", ()))
    gen_path = folder / "generation_config.json"
    if len(stops) > 1 and gen_path.is_file():  # generate stops at every end-of-turn id, as qkv chat does
        gen = json.loads(gen_path.read_text())
        gen_path.write_text(json.dumps({**gen, "eos_token_id": stops}, indent=2))


def load_params(run_dir: str | Path, step: int | None = None) -> tuple[Config, dict[str, Any], dict[str, Any]]:
    """(config, params as NumPy, meta) of a checkpoint, restored on one host (a LoRA run merged)."""
    run = load_run(run_dir, step)
    return run.config, jax.tree.map(np.asarray, jax.device_get(run.params)), run.meta


def special_ids(meta: dict[str, Any]) -> dict[str, int]:
    """bos/eos/pad ids of a checkpoint: its tokenizer's, else those of the config.json it was imported from."""
    if "tokenizer" in meta:
        tok = Tokenizer.from_bytes(checkpoint.decode_tokenizer(meta["tokenizer"]))
        ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    else:
        ids = dict(meta.get("source", {}).get("special_ids", {}))
    return {k: v for k, v in ids.items() if v is not None}


def write_shards(tensors: dict[str, np.ndarray], folder: Path, shard_bytes: int) -> list[str]:
    """float32 safetensors files of at most ~shard_bytes each (``model.safetensors``, or ``model-0000i-of-0000n``
    + ``model.safetensors.index.json``), copying only one shard's tensors at a time out of the views given."""
    from safetensors.numpy import save_file

    groups: list[list[str]] = [[]]
    size = 0
    for name, value in tensors.items():
        nbytes = value.size * 4
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    n = len(groups)
    files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for file, names in zip(files, groups):
        save_file({k: np.ascontiguousarray(tensors[k], np.float32) for k in names}, str(folder / file),
                  metadata={"format": "pt"})
    if n > 1:
        index = {"metadata": {"total_size": sum(v.size * 4 for v in tensors.values())},
                 "weight_map": {k: file for file, names in zip(files, groups) for k in names}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return files


def export_hf(run_dir: str | Path, out_dir: str | Path, arch_name: str, step: int | None = None,
              shard_bytes: int = 2 << 30) -> dict[str, Any]:
    """Write ``config.json`` + ``generation_config.json`` + float32 safetensors (sharded past ``shard_bytes``)
    that ``transformers`` loads, and the run's tokenizer (``tokenizer.model`` or ``tokenizer.json``). Holds the
    run's parameters plus one shard in memory."""
    arch = find_architecture(arch_name)
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir} exists and is not empty: choose a new output directory")
    cfg, params, meta = load_params(run_dir, step)
    arch.check(cfg.model)
    tensors = arch.params_to_hf(params, cfg.model)
    ids = special_ids(meta)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".qkv-export-{out_dir.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # unlike mkdtemp's 0700, the usual umask
    try:
        files = write_shards(tensors, tmp, shard_bytes)
        (tmp / "config.json").write_text(json.dumps({**arch.config_to_hf(cfg.model), **ids}, indent=2))
        eos_list = meta.get("eos_ids", [])  # an imported list of EOS ids goes back out whole
        generation = {**ids, "eos_token_id": eos_list} if len(eos_list) > 1 else ids
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        if "tokenizer" in meta:
            tok = Tokenizer.from_bytes(checkpoint.decode_tokenizer(meta["tokenizer"]))
            tok.save_for_hf(tmp)
            export_chat(meta, tok, tmp)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"out_dir": str(out_dir.resolve()), "arch": arch.hf_name, "tensors": len(tensors), "files": len(files),
            "step": meta["step"],
            **ids}


def merge_lora_run(run_dir: str | Path, out_dir: str | Path, step: int | None = None) -> dict[str, Any]:
    """``qkv convert merge-lora``: a LoRA run (base + adapters) -> a plain params checkpoint in out_dir."""
    run_dir, out_dir = Path(run_dir).expanduser().resolve(), Path(out_dir).expanduser().resolve()
    if checkpoint.latest_step(out_dir) is not None:
        raise UserError(f"{out_dir} already holds a checkpoint: choose a new output directory")
    cfg = config_from_dict(checkpoint.read_meta(run_dir, step)["config"])
    if cfg.finetune.lora.rank == 0:
        raise UserError(f"{run_dir} is not a LoRA run (finetune.lora.rank=0): it is already a plain checkpoint")
    run = load_run(run_dir, step)  # base + adapters, merged
    plain = dataclasses.replace(cfg, finetune=dataclasses.replace(
        cfg.finetune, lora=dataclasses.replace(cfg.finetune.lora, rank=0)))
    chat = {k: run.meta[k] for k in ("chat_template", "eos_ids") if k in run.meta}  # the chat goes along
    checkpoint.save_params(out_dir, run.params, {"config": plain.to_dict(), "tokenizer": run.meta["tokenizer"],
                                                 "source": {"merged_lora_run": str(run_dir), "step": run.step},
                                                 **chat}, step=run.step)
    return {"out_dir": str(out_dir), "step": run.step, "base": cfg.finetune.init_from,
            "adapted": [".".join(p) for p in lora_paths(run.params, cfg.finetune.lora.targets)]}
