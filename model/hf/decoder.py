"""The Llama-shaped decoder layout that Llama, Qwen 2 / 3, Mistral, OLMo 2 and Gemma 2 / 3 share.

HF stores torch ``Linear`` weights as [out, in] with heads fused into one axis; qkv keeps ``[in, heads,
head_size]`` einsum layouts and stacks layers on a leading axis. Both directions are exact reshapes and
transposes, so export → import reproduces every bit. What differs between these families is which
tensors exist (q/k/v biases, q/k norms, the norms around each sub-layer), and each family's table says
which: ``norms`` maps qkv's norm modules to the HF names; biases and QK-norm tensors follow the config.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..config import ModelConfig
from . import experts
from .fields import Tensors, rope_fields, rope_fields_to_hf, stack, unstack

LAYER = "model.layers.{i}."
# qkv norm module -> HF name, per placement of the norms
PRE_NORMS = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}  # Llama, Qwen, Mistral
OUTPUT_NORMS = {"attn_norm": "post_attention_layernorm", "mlp_norm": "post_feedforward_layernorm"}  # OLMo 2
SANDWICH_NORMS = {"attn_norm": "input_layernorm", "attn_post_norm": "post_attention_layernorm",  # Gemma 2 / 3
                  "mlp_norm": "pre_feedforward_layernorm", "mlp_post_norm": "post_feedforward_layernorm"}


def _qk_norm_shape(cfg: ModelConfig, heads: int) -> tuple[int, ...]:
    return (heads, cfg.head_size) if cfg.qk_norm == "projection" else (cfg.head_size,)


def params_from_hf(t: Tensors, cfg: ModelConfig, norms: dict[str, str],
                   experts_names: "experts.ExpertNames | None" = None) -> dict[str, Any]:
    """``experts_names``: the tensor names of a mixture of experts' routed experts (model/hf/experts.py)."""
    d, h, k, e, n = cfg.d_model, cfg.n_heads, cfg.num_kv_heads, cfg.head_size, cfg.n_layers
    attn: dict[str, Any] = {
        "wq": stack(t, n, LAYER + "self_attn.q_proj.weight", lambda w: w.T.reshape(d, h, e)),
        "wk": stack(t, n, LAYER + "self_attn.k_proj.weight", lambda w: w.T.reshape(d, k, e)),
        "wv": stack(t, n, LAYER + "self_attn.v_proj.weight", lambda w: w.T.reshape(d, k, e)),
        "wo": stack(t, n, LAYER + "self_attn.o_proj.weight", lambda w: w.T.reshape(h, e, d)),
    }
    if cfg.qkv_bias:
        for c, heads in (("q", h), ("k", k), ("v", k)):
            attn[f"b{c}"] = stack(t, n, LAYER + f"self_attn.{c}_proj.bias", lambda b, heads=heads: b.reshape(heads, e))
    if cfg.qk_norm in ("head", "projection"):
        for c, heads in (("q", h), ("k", k)):
            shape = _qk_norm_shape(cfg, heads)
            attn[f"{c}_norm"] = {"scale": stack(t, n, LAYER + f"self_attn.{c}_norm.weight", lambda w: w.reshape(shape))}
    blocks: dict[str, Any] = {
        "attn": attn,
        "mlp": experts.params_from_hf(t, cfg, experts_names) if cfg.n_experts else
        {"wg": stack(t, n, LAYER + "mlp.gate_proj.weight", lambda w: w.T),
         "wi": stack(t, n, LAYER + "mlp.up_proj.weight", lambda w: w.T),
         "wo": stack(t, n, LAYER + "mlp.down_proj.weight", lambda w: w.T)},
    }
    for module, hf_name in norms.items():
        blocks[module] = {"scale": stack(t, n, LAYER + hf_name + ".weight", lambda w: w)}
    params = {"embed": t["model.embed_tokens.weight"], "final_norm": {"scale": t["model.norm.weight"]}, "blocks": blocks}
    if not cfg.tie_embeddings:
        params["lm_head"] = t["lm_head.weight"].T
    return params


def params_to_hf(p: dict[str, Any], cfg: ModelConfig, norms: dict[str, str], qk_norm_tensors: bool,
                 unit: float = 1.0, experts_names: "experts.ExpertNames | None" = None) -> Tensors:
    """``qk_norm_tensors``: the family has q/k norms; a scale-free ("rms") qkv QK-norm is written with scales
    equal to ``unit`` (1, or 0 where the family scales by 1 + w)."""
    d, h, k, e = cfg.d_model, cfg.n_heads, cfg.num_kv_heads, cfg.head_size
    out = {"model.embed_tokens.weight": p["embed"], "model.norm.weight": p["final_norm"]["scale"]}
    attn, mlp = p["blocks"]["attn"], p["blocks"]["mlp"]
    unstack(out, attn["wq"], LAYER + "self_attn.q_proj.weight", lambda w: w.reshape(d, h * e).T)
    unstack(out, attn["wk"], LAYER + "self_attn.k_proj.weight", lambda w: w.reshape(d, k * e).T)
    unstack(out, attn["wv"], LAYER + "self_attn.v_proj.weight", lambda w: w.reshape(d, k * e).T)
    unstack(out, attn["wo"], LAYER + "self_attn.o_proj.weight", lambda w: w.reshape(h * e, d).T)
    if cfg.qkv_bias:
        for c in "qkv":
            unstack(out, attn[f"b{c}"], LAYER + f"self_attn.{c}_proj.bias", lambda b: b.reshape(-1))
    if qk_norm_tensors:
        for c, heads in (("q", h), ("k", k)):
            if cfg.qk_norm == "rms":
                scale = np.full((cfg.n_layers, *_qk_norm_shape(cfg, heads)), unit, np.float32)
            else:
                scale = attn[f"{c}_norm"]["scale"]
            unstack(out, scale, LAYER + f"self_attn.{c}_norm.weight", lambda w: w.reshape(-1))
    if cfg.n_experts:
        experts.params_to_hf(out, mlp, cfg, experts_names)
    else:
        unstack(out, mlp["wg"], LAYER + "mlp.gate_proj.weight", lambda w: w.T)
        unstack(out, mlp["wi"], LAYER + "mlp.up_proj.weight", lambda w: w.T)
        unstack(out, mlp["wo"], LAYER + "mlp.down_proj.weight", lambda w: w.T)
    for module, hf_name in norms.items():
        unstack(out, p["blocks"][module]["scale"], LAYER + hf_name + ".weight", lambda w: w)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = p["lm_head"].T
    return out


def base_config(hf: dict[str, Any], **fixed: Any) -> ModelConfig:
    """The fields every Llama-shaped config.json has, plus the family's ``fixed`` options."""
    n_heads = hf["num_attention_heads"]
    rope = {} if "rope_theta" in fixed else rope_fields(hf)
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        d_ff=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 2048), positions="rope",
        norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), use_bias=False,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), **{"activation": "swiglu", **rope, **fixed})


def base_config_to_hf(cfg: ModelConfig, arch: str, model_type: str) -> dict[str, Any]:
    return {
        "architectures": [arch], "model_type": model_type, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_size, "intermediate_size": cfg.d_ff,
        "max_position_embeddings": cfg.max_seq_len, **rope_fields_to_hf(cfg), "rms_norm_eps": cfg.norm_eps,
        "hidden_act": "silu", "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": "float32",
    }


# config.json fields every Llama-shaped family maps (base_config reads them)
BASE_MAPPED = {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "head_dim", "intermediate_size", "max_position_embeddings", "rope_theta", "rope_parameters",
               "rope_scaling", "partial_rotary_factor", "rms_norm_eps", "tie_word_embeddings", "attention_dropout"}
