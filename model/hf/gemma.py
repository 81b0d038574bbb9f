"""Gemma 2 and Gemma 3 text (Gemma2ForCausalLM, Gemma3ForCausalLM): what the two share.

Both: embeddings times sqrt(d_model) (``model.embed_scale``), RMSNorm scaling by (1 + w)
(``model.norm_scale_offset``), four norms per block (``model.sandwich_norm``), a GeGLU feed-forward,
scores scaled by ``query_pre_attn_scalar ** -0.5`` (``model.query_scale``), and sliding-window layers
named in ``layer_types`` (``model.layer_types``, ``model.sliding_window``). Gemma 2 adds soft-caps on
the attention scores and the final logits; Gemma 3 a per-head QK-norm and its own RoPE base for
sliding layers.
"""
from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from . import decoder
from .fields import layer_types_from_hf, layer_types_to_hf

MAPPED = decoder.BASE_MAPPED | {"hidden_activation", "query_pre_attn_scalar", "sliding_window", "layer_types",
                                "final_logit_softcapping", "attn_logit_softcapping", "sliding_window_pattern"}
REQUIRED = {"attention_bias": (False,), "use_bidirectional_attention": (None, False),
            "hidden_activation": ("gelu_pytorch_tanh",), "hidden_act": ("gelu_pytorch_tanh",)}
FIXED = dict(activation="geglu", embed_scale=True, norm_scale_offset=True, sandwich_norm=True)


def gemma_fields(hf: dict[str, Any], default_pattern: int) -> dict[str, Any]:
    n = hf["num_hidden_layers"]
    if hf.get("layer_types") is not None:
        types = layer_types_from_hf(hf["layer_types"], n)
    else:
        pattern = hf.get("sliding_window_pattern", default_pattern)
        types = tuple("sliding" if (i + 1) % pattern else "full" for i in range(n))
    window = int(hf.get("sliding_window") or 0)
    if not window:
        types = ("full",) * n
    return dict(FIXED, query_scale=float(hf.get("query_pre_attn_scalar", 256)) ** -0.5, sliding_window=window,
                layer_types=types, attn_softcap=float(hf.get("attn_logit_softcapping") or 0.0),
                logit_softcap=float(hf.get("final_logit_softcapping") or 0.0))


def gemma_fields_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    scalar = cfg.query_scale ** -2 if cfg.query_scale else float(cfg.head_size)
    scalar = round(scalar) if abs(scalar - round(scalar)) < 1e-6 else scalar
    out = {key: value for key, value in decoder.base_config_to_hf(cfg, "", "").items()
           if key not in ("architectures", "model_type", "hidden_act")}
    return {**out, "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": scalar,
            "sliding_window": cfg.sliding_window or None, "layer_types": layer_types_to_hf(cfg),
            "attn_logit_softcapping": cfg.attn_softcap or None, "final_logit_softcapping": cfg.logit_softcap or None,
            "attention_bias": False, "use_bidirectional_attention": False}
