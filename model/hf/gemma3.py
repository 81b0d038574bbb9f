"""Gemma 3 text (Gemma3ForCausalLM, model_type gemma3_text): see gemma.py; five sliding layers to one
full, a per-head QK-norm scaled by (1 + w), and RoPE bases per layer type (10k sliding, 1M full, the
full layers' optionally linearly scaled)."""
from __future__ import annotations

from typing import Any

from qkv.errors import UserError

from ..config import ModelConfig
from . import decoder, gemma
from .fields import Architecture, check_fields, rope_fields, rope_fields_to_hf

HF_NAME = "Gemma3ForCausalLM"
MAPPED = gemma.MAPPED | {"rope_local_base_freq"}


def _rope(hf: dict[str, Any]) -> dict[str, Any]:
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:  # transformers 5: one entry per layer type
        unknown = set(params) - {"full_attention", "sliding_attention"}
        if unknown:
            raise UserError(f"config.json rope_parameters key {sorted(unknown)[0]!r} is unknown to qkv's Gemma 3 "
                            "converter and might change the math")
        full = rope_fields({"rope_parameters": params.get("full_attention") or {"rope_theta": 1_000_000.0}})
        local = rope_fields({"rope_parameters": params.get("sliding_attention") or {"rope_theta": 10_000.0}})
    else:  # the older layout: rope_theta (+ rope_scaling) for full layers, rope_local_base_freq for sliding ones
        full = rope_fields({"rope_theta": 1_000_000.0, **hf})
        local = {"rope_theta": float(hf.get("rope_local_base_freq", 10_000.0))}
    if set(local) != {"rope_theta"}:
        raise UserError("config.json rope_parameters['sliding_attention'] scales RoPE: qkv computes scaled RoPE for "
                        "full layers only")
    return {**full, "rope_local_theta": local["rope_theta"]}


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    check_fields(hf, "Gemma 3", MAPPED, gemma.REQUIRED)
    hf = {"tie_word_embeddings": True, "sliding_window": 4096, **hf}
    return decoder.base_config(hf, qk_norm="head", **_rope(hf), **gemma.gemma_fields(hf, default_pattern=6))


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    full = rope_fields_to_hf(cfg)["rope_parameters"]
    local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta}
    out = {"architectures": [HF_NAME], "model_type": "gemma3_text", **gemma.gemma_fields_to_hf(cfg)}
    out.pop("rope_theta", None)
    return {**out, "rope_parameters": {"full_attention": full, "sliding_attention": local}}


ARCH = Architecture(
    "gemma3", HF_NAME, "gemma3_text", config_from_hf, config_to_hf,
    lambda t, cfg: decoder.params_from_hf(t, cfg, decoder.SANDWICH_NORMS),
    lambda p, cfg: decoder.params_to_hf(p, cfg, decoder.SANDWICH_NORMS, qk_norm_tensors=True, unit=0.0))
