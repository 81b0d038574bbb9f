"""Qwen 2 / 2.5 (Qwen2ForCausalLM): Llama with biases on the q/k/v projections (``model.qkv_bias``).

``use_sliding_window`` (off in every released Qwen 2.5 checkpoint) would window the layers from
``max_window_layers`` on; qkv maps it through ``model.layer_types``.
"""
from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from . import decoder
from .fields import Architecture, check_fields, sliding_layers, sliding_layers_to_hf

HF_NAME = "Qwen2ForCausalLM"
MAPPED = decoder.BASE_MAPPED | {"use_sliding_window", "sliding_window", "max_window_layers", "layer_types"}
REQUIRED = {"hidden_act": ("silu",)}


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    check_fields(hf, "Qwen 2", MAPPED, REQUIRED)
    return decoder.base_config(hf, qkv_bias=True, **sliding_layers(hf))


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {**decoder.base_config_to_hf(cfg, HF_NAME, "qwen2"), **sliding_layers_to_hf(cfg)}


ARCH = Architecture(
    "qwen2", HF_NAME, "qwen2", config_from_hf, config_to_hf,
    lambda t, cfg: decoder.params_from_hf(t, cfg, decoder.PRE_NORMS),
    lambda p, cfg: decoder.params_to_hf(p, cfg, decoder.PRE_NORMS, qk_norm_tensors=False))
