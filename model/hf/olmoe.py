"""OLMoE (OlmoeForCausalLM): a Llama-shaped decoder with a learned RMS QK-norm over the whole q / k
projection (``model.qk_norm=projection``) and a mixture of SwiGLU experts of ``intermediate_size`` in every
layer; ``norm_topk_prob`` picks the router (false, OLMoE's: ``softmax``; true: ``softmax_normalized``).
``clip_qkv`` is refused by name."""
from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from . import decoder, experts
from .fields import Architecture, check_fields

HF_NAME = "OlmoeForCausalLM"
MAPPED = decoder.BASE_MAPPED | {"num_experts", "num_experts_per_tok", "norm_topk_prob", "router_aux_loss_coef",
                                "router_z_loss_coef", "output_router_logits"}
REQUIRED = {"hidden_act": ("silu",), "attention_bias": (False,), "clip_qkv": (None,)}


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    check_fields(hf, "OLMoE", MAPPED, REQUIRED)
    return decoder.base_config({"rms_norm_eps": 1e-5, **hf}, qk_norm="projection", n_experts=hf["num_experts"],
                               n_experts_per_token=hf["num_experts_per_tok"],
                               router="softmax_normalized" if hf.get("norm_topk_prob", False) else "softmax",
                               router_aux_loss_weight=float(hf.get("router_aux_loss_coef", 0.01)),
                               router_z_loss_weight=float(hf.get("router_z_loss_coef", 0.001)))


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {**decoder.base_config_to_hf(cfg, HF_NAME, "olmoe"), "intermediate_size": cfg.expert_d_ff,
            "attention_bias": False, "clip_qkv": None, "num_experts": cfg.n_experts,
            "num_experts_per_tok": cfg.n_experts_per_token, "norm_topk_prob": cfg.router == "softmax_normalized",
            "router_aux_loss_coef": cfg.router_aux_loss_weight}


ARCH = Architecture(
    "olmoe", HF_NAME, "olmoe", config_from_hf, config_to_hf,
    lambda t, cfg: decoder.params_from_hf(t, cfg, decoder.PRE_NORMS, experts.QWEN_STYLE),
    lambda p, cfg: decoder.params_to_hf(p, cfg, decoder.PRE_NORMS, qk_norm_tensors=True,
                                        experts_names=experts.QWEN_STYLE))
