"""Hugging Face ⇄ qkv: one small table per family behind one registry (pure array mapping).

Each family file holds its config.json fields (mapped onto ``ModelConfig`` / required to equal what qkv
computes / known inert: anything else is refused by name) and its tensor names. The Llama-shaped families
share one tensor layout (decoder.py); GPT-2 has its own. Import and export are exact reshapes and
transposes, so export → import reproduces every bit; export first checks, by mapping the run's
configuration to config.json and back, that the family holds the run exactly (fields.check_holds).
File I/O lives in ``qkv.tools.convert``; this package only maps dicts of NumPy arrays.

A new family is one file here and one line in ``_FAMILIES``.
"""
from __future__ import annotations

from typing import Any

from qkv.errors import UserError

from . import gemma2, gemma3, gpt2, llama, mistral, mixtral, olmo2, olmoe, qwen2, qwen3, qwen3_moe
from .fields import INERT_FIELDS, Architecture, Tensors, check_holds, rope_fields, rope_fields_to_hf

_FAMILIES = (llama, gpt2, qwen2, qwen3, mistral, gemma2, gemma3, olmo2, mixtral, qwen3_moe, olmoe)

ARCHITECTURES: dict[str, Architecture] = {f.ARCH.name: f.ARCH for f in _FAMILIES}  # short name -> family
_BY_MODEL_TYPE = {a.model_type: a for a in ARCHITECTURES.values()}
_BY_HF_NAME = {a.hf_name.lower(): a for a in ARCHITECTURES.values()}


def architecture_of(hf_config: dict[str, Any]) -> Architecture:
    """The family of a config.json (by ``model_type``), refused by name when qkv does not convert it."""
    model_type = hf_config.get("model_type")
    if model_type not in _BY_MODEL_TYPE:
        raise UserError(f"Hugging Face model_type {model_type!r} is not supported: qkv converts "
                        f"{', '.join(sorted(_BY_MODEL_TYPE))}")
    return _BY_MODEL_TYPE[model_type]


def find_architecture(name: str) -> Architecture:
    """``--arch NAME``: a short family name (qwen3) or the transformers class (Qwen3ForCausalLM)."""
    arch = ARCHITECTURES.get(name.lower()) or _BY_HF_NAME.get(name.lower())
    if arch is None:
        choices = ", ".join(f"{a.name} ({a.hf_name})" for a in ARCHITECTURES.values())
        raise UserError(f"--arch {name!r} is not supported: choose one of {choices}")
    return arch


__all__ = ["ARCHITECTURES", "INERT_FIELDS", "Architecture", "Tensors", "architecture_of", "check_holds",
           "find_architecture", "rope_fields", "rope_fields_to_hf"]
