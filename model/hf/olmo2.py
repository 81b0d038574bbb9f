"""OLMo 2 (Olmo2ForCausalLM): norms on each sub-layer's output before the residual add
(``model.norm_position=output``) and a learned RMS QK-norm over the whole q / k projection
(``model.qk_norm=projection``)."""
from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from . import decoder
from .fields import Architecture, check_fields

HF_NAME = "Olmo2ForCausalLM"
MAPPED = decoder.BASE_MAPPED
REQUIRED = {"hidden_act": ("silu",), "attention_bias": (False,)}


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    check_fields(hf, "OLMo 2", MAPPED, REQUIRED)
    return decoder.base_config({"rms_norm_eps": 1e-5, **hf}, qk_norm="projection", norm_position="output")


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {**decoder.base_config_to_hf(cfg, HF_NAME, "olmo2"), "attention_bias": False}


ARCH = Architecture(
    "olmo2", HF_NAME, "olmo2", config_from_hf, config_to_hf,
    lambda t, cfg: decoder.params_from_hf(t, cfg, decoder.OUTPUT_NORMS),
    lambda p, cfg: decoder.params_to_hf(p, cfg, decoder.OUTPUT_NORMS, qk_norm_tensors=True))
