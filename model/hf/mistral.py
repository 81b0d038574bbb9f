"""Mistral (MistralForCausalLM): Llama with a sliding window on every layer (v0.1: 4096; null: none)."""
from __future__ import annotations

from typing import Any

from qkv.errors import UserError

from ..config import ModelConfig
from . import decoder
from .fields import Architecture, check_fields

HF_NAME = "MistralForCausalLM"
MAPPED = decoder.BASE_MAPPED | {"sliding_window"}
REQUIRED = {"hidden_act": ("silu",)}


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    check_fields(hf, "Mistral", MAPPED, REQUIRED)
    return decoder.base_config(hf, sliding_window=int(hf.get("sliding_window") or 0))


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    sliding = cfg.layer_is_sliding()
    if any(sliding) and not all(sliding):
        raise UserError("Mistral windows every layer or none: model.layer_types mixes sliding and full layers")
    return {**decoder.base_config_to_hf(cfg, HF_NAME, "mistral"),
            "sliding_window": cfg.sliding_window if any(sliding) else None}


ARCH = Architecture(
    "mistral", HF_NAME, "mistral", config_from_hf, config_to_hf,
    lambda t, cfg: decoder.params_from_hf(t, cfg, decoder.PRE_NORMS),
    lambda p, cfg: decoder.params_to_hf(p, cfg, decoder.PRE_NORMS, qk_norm_tensors=False))
