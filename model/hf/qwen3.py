"""Qwen 3 (Qwen3ForCausalLM): Llama with a learned per-head RMS QK-norm (``model.qk_norm=head``).

qkv's scale-free per-head QK-norm (``model.qk_norm=rms``, the ``tiny`` preset) exports here exactly,
with unit q/k norm scales.
"""
from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from . import decoder
from .fields import Architecture, check_fields, sliding_layers, sliding_layers_to_hf

HF_NAME = "Qwen3ForCausalLM"
MAPPED = decoder.BASE_MAPPED | {"use_sliding_window", "sliding_window", "max_window_layers", "layer_types"}
REQUIRED = {"hidden_act": ("silu",), "attention_bias": (False,)}


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    check_fields(hf, "Qwen 3", MAPPED, REQUIRED)
    return decoder.base_config(hf, qk_norm="head", **sliding_layers(hf))


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {**decoder.base_config_to_hf(cfg, HF_NAME, "qwen3"), "attention_bias": False, **sliding_layers_to_hf(cfg)}


ARCH = Architecture(
    "qwen3", HF_NAME, "qwen3", config_from_hf, config_to_hf,
    lambda t, cfg: decoder.params_from_hf(t, cfg, decoder.PRE_NORMS),
    lambda p, cfg: decoder.params_to_hf(p, cfg, decoder.PRE_NORMS, qk_norm_tensors=True))
