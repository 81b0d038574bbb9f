"""Mixtral (MixtralForCausalLM): Mistral's decoder with a top-k mixture of SwiGLU experts in every layer
(``model.n_experts``, router ``softmax_normalized``: the top-k softmax weights renormalised)."""
from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from . import decoder, experts
from .fields import Architecture, check_fields

HF_NAME = "MixtralForCausalLM"
MAPPED = decoder.BASE_MAPPED | {"num_local_experts", "num_experts_per_tok", "router_aux_loss_coef",
                                "output_router_logits", "sliding_window"}
REQUIRED = {"hidden_act": ("silu",), "router_jitter_noise": (0.0, 0)}


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    check_fields(hf, "Mixtral", MAPPED, REQUIRED)
    return decoder.base_config(hf, sliding_window=int(hf.get("sliding_window") or 0),
                               n_experts=hf["num_local_experts"], n_experts_per_token=hf["num_experts_per_tok"],
                               router="softmax_normalized",
                               router_aux_loss_weight=float(hf.get("router_aux_loss_coef", 0.02)))


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {**decoder.base_config_to_hf(cfg, HF_NAME, "mixtral"), "intermediate_size": cfg.expert_d_ff,
            "num_local_experts": cfg.n_experts, "num_experts_per_tok": cfg.n_experts_per_token,
            "router_aux_loss_coef": cfg.router_aux_loss_weight, "router_jitter_noise": 0.0,
            "sliding_window": cfg.sliding_window or None}


ARCH = Architecture(
    "mixtral", HF_NAME, "mixtral", config_from_hf, config_to_hf,
    lambda t, cfg: decoder.params_from_hf(t, cfg, decoder.PRE_NORMS, experts.MIXTRAL),
    lambda p, cfg: decoder.params_to_hf(p, cfg, decoder.PRE_NORMS, qk_norm_tensors=False,
                                        experts_names=experts.MIXTRAL))
