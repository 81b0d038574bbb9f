"""Gemma 2 (Gemma2ForCausalLM): see gemma.py; alternating sliding and full layers, soft-caps 50 and 30."""
from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from . import decoder, gemma
from .fields import Architecture, check_fields

HF_NAME = "Gemma2ForCausalLM"


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    check_fields(hf, "Gemma 2", gemma.MAPPED, gemma.REQUIRED)
    hf = {"tie_word_embeddings": True, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
          "sliding_window": 4096, **hf}
    return decoder.base_config(hf, **gemma.gemma_fields(hf, default_pattern=2))


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {"architectures": [HF_NAME], "model_type": "gemma2", **gemma.gemma_fields_to_hf(cfg)}


ARCH = Architecture(
    "gemma2", HF_NAME, "gemma2", config_from_hf, config_to_hf,
    lambda t, cfg: decoder.params_from_hf(t, cfg, decoder.SANDWICH_NORMS),
    lambda p, cfg: decoder.params_to_hf(p, cfg, decoder.SANDWICH_NORMS, qk_norm_tensors=False))
