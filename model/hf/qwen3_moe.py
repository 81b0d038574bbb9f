"""Qwen 3 MoE (Qwen3MoeForCausalLM): Qwen 3 (learned per-head QK-norm) with a mixture of SwiGLU experts of
``moe_intermediate_size`` in every layer; ``norm_topk_prob`` picks the router (true: ``softmax_normalized``,
false: ``softmax``). Dense layers among sparse ones (``decoder_sparse_step`` > 1, ``mlp_only_layers``) are
refused by name."""
from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from . import decoder, experts
from .fields import Architecture, check_fields, sliding_layers, sliding_layers_to_hf

HF_NAME = "Qwen3MoeForCausalLM"
MAPPED = decoder.BASE_MAPPED | {"moe_intermediate_size", "num_experts", "num_local_experts", "num_experts_per_tok",
                                "norm_topk_prob", "router_aux_loss_coef", "output_router_logits",
                                "use_sliding_window", "sliding_window", "max_window_layers", "layer_types"}
REQUIRED = {"hidden_act": ("silu",), "attention_bias": (False,), "decoder_sparse_step": (1,), "mlp_only_layers": ([],)}


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    check_fields(hf, "Qwen 3 MoE", MAPPED, REQUIRED)
    return decoder.base_config(hf, qk_norm="head", **sliding_layers(hf),
                               n_experts=hf.get("num_experts") or hf["num_local_experts"],
                               n_experts_per_token=hf["num_experts_per_tok"], moe_d_ff=hf["moe_intermediate_size"],
                               router="softmax_normalized" if hf.get("norm_topk_prob", False) else "softmax",
                               router_aux_loss_weight=float(hf.get("router_aux_loss_coef", 0.001)))


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {**decoder.base_config_to_hf(cfg, HF_NAME, "qwen3_moe"), "attention_bias": False,
            **sliding_layers_to_hf(cfg), "num_experts": cfg.n_experts, "num_experts_per_tok": cfg.n_experts_per_token,
            "moe_intermediate_size": cfg.expert_d_ff, "norm_topk_prob": cfg.router == "softmax_normalized",
            "router_aux_loss_coef": cfg.router_aux_loss_weight, "decoder_sparse_step": 1, "mlp_only_layers": []}


ARCH = Architecture(
    "qwen3_moe", HF_NAME, "qwen3_moe", config_from_hf, config_to_hf,
    lambda t, cfg: decoder.params_from_hf(t, cfg, decoder.PRE_NORMS, experts.QWEN_STYLE),
    lambda p, cfg: decoder.params_to_hf(p, cfg, decoder.PRE_NORMS, qk_norm_tensors=True,
                                        experts_names=experts.QWEN_STYLE))
