"""Llama (LlamaForCausalLM): RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases."""
from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from . import decoder
from .fields import Architecture, check_fields

HF_NAME = "LlamaForCausalLM"
MAPPED = decoder.BASE_MAPPED | {"pretraining_tp"}  # pretraining_tp: transformers 5 no longer reads it (same math)
REQUIRED = {"hidden_act": ("silu",), "attention_bias": (False,), "mlp_bias": (False,)}


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    check_fields(hf, "Llama", MAPPED, REQUIRED)
    return decoder.base_config(hf)


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {**decoder.base_config_to_hf(cfg, HF_NAME, "llama"), "attention_bias": False, "mlp_bias": False}


ARCH = Architecture(
    "llama", HF_NAME, "llama", config_from_hf, config_to_hf,
    lambda t, cfg: decoder.params_from_hf(t, cfg, decoder.PRE_NORMS),
    lambda p, cfg: decoder.params_to_hf(p, cfg, decoder.PRE_NORMS, qk_norm_tensors=False))
