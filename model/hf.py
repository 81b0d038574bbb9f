"""Hugging Face ⇄ qkv weight layouts for the Llama and GPT-2 architectures (pure array mapping).

HF stores torch ``Linear`` weights as [out, in] (GPT-2's ``Conv1D`` as [in, out]) with heads fused
into one axis; qkv keeps ``[in, heads, head_size]`` einsum layouts and stacks layers on a leading
axis. Both directions are exact reshapes/transposes, so export → import reproduces every bit.
File I/O lives in ``qkv.tools.convert``; this module only maps dicts of NumPy arrays.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .config import ModelConfig

Tensors = dict[str, np.ndarray]


def _stack(tensors: Tensors, n_layers: int, name: str, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    return np.stack([fn(tensors[name.format(i=i)]) for i in range(n_layers)])


def _unstack(out: Tensors, stacked: np.ndarray, name: str, fn: Callable[[np.ndarray], np.ndarray]) -> None:
    for i, layer in enumerate(stacked):
        out[name.format(i=i)] = np.ascontiguousarray(fn(layer))


# ---------------------------------------------------------------------------------------------
# Llama (LlamaForCausalLM): RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases


def llama_config(hf: dict[str, Any]) -> ModelConfig:
    if hf.get("rope_scaling"):
        raise ValueError(f"rope_scaling={hf['rope_scaling']!r} is not supported yet: only plain RoPE converts exactly")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError("Llama checkpoints with attention_bias/mlp_bias are not supported")
    n_heads = hf["num_attention_heads"]
    rope_theta = hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads", n_heads), head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        d_ff=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 2048), positions="rope",
        rope_theta=float(rope_theta), norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), activation="swiglu",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), use_bias=False)


def llama_config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_size, "intermediate_size": cfg.d_ff,
        "max_position_embeddings": cfg.max_seq_len, "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.norm_eps,
        "hidden_act": "silu", "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False,
        "mlp_bias": False, "torch_dtype": "float32", "bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0,
    }


def llama_from_hf(t: Tensors, cfg: ModelConfig) -> dict[str, Any]:
    d, h, k, e, n = cfg.d_model, cfg.n_heads, cfg.num_kv_heads, cfg.head_size, cfg.n_layers
    layer = "model.layers.{i}."
    params: dict[str, Any] = {
        "embed": t["model.embed_tokens.weight"],
        "final_norm": {"scale": t["model.norm.weight"]},
        "blocks": {
            "attn": {
                "wq": _stack(t, n, layer + "self_attn.q_proj.weight", lambda w: w.T.reshape(d, h, e)),
                "wk": _stack(t, n, layer + "self_attn.k_proj.weight", lambda w: w.T.reshape(d, k, e)),
                "wv": _stack(t, n, layer + "self_attn.v_proj.weight", lambda w: w.T.reshape(d, k, e)),
                "wo": _stack(t, n, layer + "self_attn.o_proj.weight", lambda w: w.T.reshape(h, e, d)),
            },
            "attn_norm": {"scale": _stack(t, n, layer + "input_layernorm.weight", lambda w: w)},
            "mlp": {
                "wg": _stack(t, n, layer + "mlp.gate_proj.weight", lambda w: w.T),
                "wi": _stack(t, n, layer + "mlp.up_proj.weight", lambda w: w.T),
                "wo": _stack(t, n, layer + "mlp.down_proj.weight", lambda w: w.T),
            },
            "mlp_norm": {"scale": _stack(t, n, layer + "post_attention_layernorm.weight", lambda w: w)},
        },
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = t["lm_head.weight"].T
    return params


def llama_to_hf(p: dict[str, Any], cfg: ModelConfig) -> Tensors:
    d, h, k, e = cfg.d_model, cfg.n_heads, cfg.num_kv_heads, cfg.head_size
    layer, out = "model.layers.{i}.", {"model.embed_tokens.weight": p["embed"], "model.norm.weight": p["final_norm"]["scale"]}
    attn, mlp = p["blocks"]["attn"], p["blocks"]["mlp"]
    _unstack(out, attn["wq"], layer + "self_attn.q_proj.weight", lambda w: w.reshape(d, h * e).T)
    _unstack(out, attn["wk"], layer + "self_attn.k_proj.weight", lambda w: w.reshape(d, k * e).T)
    _unstack(out, attn["wv"], layer + "self_attn.v_proj.weight", lambda w: w.reshape(d, k * e).T)
    _unstack(out, attn["wo"], layer + "self_attn.o_proj.weight", lambda w: w.reshape(h * e, d).T)
    _unstack(out, p["blocks"]["attn_norm"]["scale"], layer + "input_layernorm.weight", lambda w: w)
    _unstack(out, mlp["wg"], layer + "mlp.gate_proj.weight", lambda w: w.T)
    _unstack(out, mlp["wi"], layer + "mlp.up_proj.weight", lambda w: w.T)
    _unstack(out, mlp["wo"], layer + "mlp.down_proj.weight", lambda w: w.T)
    _unstack(out, p["blocks"]["mlp_norm"]["scale"], layer + "post_attention_layernorm.weight", lambda w: w)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = np.ascontiguousarray(p["lm_head"].T)
    return out


# ---------------------------------------------------------------------------------------------
# GPT-2 (GPT2LMHeadModel): learned positions, LayerNorm, GELU (tanh), biases, tied output


def gpt2_config(hf: dict[str, Any]) -> ModelConfig:
    d = hf["n_embd"]
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"GPT-2 activation {hf['activation_function']!r} is not supported: only the tanh GELU")
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["n_layer"], n_heads=hf["n_head"],
        d_ff=hf.get("n_inner") or 4 * d, max_seq_len=hf["n_positions"], positions="learned", norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), activation="gelu", use_bias=True, tie_embeddings=True)


def gpt2_config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
        "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.d_ff,
        "n_positions": cfg.max_seq_len, "layer_norm_epsilon": cfg.norm_eps, "activation_function": "gelu_new",
        "tie_word_embeddings": True, "torch_dtype": "float32", "bos_token_id": 2, "eos_token_id": 3,
    }


def _check_gpt2_shape(cfg: ModelConfig) -> None:
    wanted = dict(positions="learned", norm="layernorm", activation="gelu", use_bias=True, tie_embeddings=True,
                  norm_position="pre")
    for key, value in wanted.items():
        if getattr(cfg, key) != value:
            raise ValueError(f"GPT-2 export needs model.{key}={value!r}, this model has {getattr(cfg, key)!r}")
    if cfg.num_kv_heads != cfg.n_heads or cfg.head_size * cfg.n_heads != cfg.d_model:
        raise ValueError("GPT-2 export needs plain multi-head attention with head_size * n_heads == d_model")


def gpt2_from_hf(t: Tensors, cfg: ModelConfig) -> dict[str, Any]:
    d, h, e, n = cfg.d_model, cfg.n_heads, cfg.head_size, cfg.n_layers
    t = {k.removeprefix("transformer."): v for k, v in t.items()}
    layer = "h.{i}."

    def qkv_part(i: int, bias: bool) -> Callable[[np.ndarray], np.ndarray]:
        if bias:
            return lambda b: b[i * d:(i + 1) * d].reshape(h, e)
        return lambda w: w[:, i * d:(i + 1) * d].reshape(d, h, e)  # Conv1D stores [in, out]

    def norm(name: str) -> dict[str, np.ndarray]:
        return {"scale": _stack(t, n, layer + name + ".weight", lambda w: w),
                "bias": _stack(t, n, layer + name + ".bias", lambda w: w)}

    attn = {f"w{c}": _stack(t, n, layer + "attn.c_attn.weight", qkv_part(i, False)) for i, c in enumerate("qkv")}
    attn.update({f"b{c}": _stack(t, n, layer + "attn.c_attn.bias", qkv_part(i, True)) for i, c in enumerate("qkv")})
    attn["wo"] = _stack(t, n, layer + "attn.c_proj.weight", lambda w: w.reshape(h, e, d))
    attn["bo"] = _stack(t, n, layer + "attn.c_proj.bias", lambda w: w)
    mlp = {"wi": _stack(t, n, layer + "mlp.c_fc.weight", lambda w: w),
           "bi": _stack(t, n, layer + "mlp.c_fc.bias", lambda w: w),
           "wo": _stack(t, n, layer + "mlp.c_proj.weight", lambda w: w),
           "bo": _stack(t, n, layer + "mlp.c_proj.bias", lambda w: w)}
    return {"embed": t["wte.weight"], "pos_embed": t["wpe.weight"],
            "final_norm": {"scale": t["ln_f.weight"], "bias": t["ln_f.bias"]},
            "blocks": {"attn": attn, "attn_norm": norm("ln_1"), "mlp": mlp, "mlp_norm": norm("ln_2")}}


def gpt2_to_hf(p: dict[str, Any], cfg: ModelConfig) -> Tensors:
    _check_gpt2_shape(cfg)
    d = cfg.d_model
    b, layer = p["blocks"], "transformer.h.{i}."
    out = {"transformer.wte.weight": p["embed"], "transformer.wpe.weight": p["pos_embed"],
           "transformer.ln_f.weight": p["final_norm"]["scale"], "transformer.ln_f.bias": p["final_norm"]["bias"]}
    fused_w = np.concatenate([b["attn"][f"w{c}"].reshape(cfg.n_layers, d, d) for c in "qkv"], axis=-1)
    fused_b = np.concatenate([b["attn"][f"b{c}"].reshape(cfg.n_layers, d) for c in "qkv"], axis=-1)
    _unstack(out, fused_w, layer + "attn.c_attn.weight", lambda w: w)
    _unstack(out, fused_b, layer + "attn.c_attn.bias", lambda w: w)
    _unstack(out, b["attn"]["wo"], layer + "attn.c_proj.weight", lambda w: w.reshape(d, d))
    _unstack(out, b["attn"]["bo"], layer + "attn.c_proj.bias", lambda w: w)
    for name, key in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
        _unstack(out, b[key]["scale"], layer + name + ".weight", lambda w: w)
        _unstack(out, b[key]["bias"], layer + name + ".bias", lambda w: w)
    for name, key in (("c_fc.weight", "wi"), ("c_fc.bias", "bi"), ("c_proj.weight", "wo"), ("c_proj.bias", "bo")):
        _unstack(out, b["mlp"][key], layer + "mlp." + name, lambda w: w)
    return out


def _check_llama_shape(cfg: ModelConfig) -> None:
    wanted = dict(positions="rope", norm="rmsnorm", activation="swiglu", use_bias=False, norm_position="pre")
    for key, value in wanted.items():
        if getattr(cfg, key) != value:
            raise ValueError(f"Llama export needs model.{key}={value!r}, this model has {getattr(cfg, key)!r}")


@dataclass(frozen=True)
class Architecture:
    """How one HF architecture maps to qkv: configs both ways and parameters both ways."""

    hf_name: str
    config_from_hf: Callable[[dict[str, Any]], ModelConfig]
    config_to_hf: Callable[[ModelConfig], dict[str, Any]]
    params_from_hf: Callable[[Tensors, ModelConfig], dict[str, Any]]
    params_to_hf: Callable[[dict[str, Any], ModelConfig], Tensors]
    check: Callable[[ModelConfig], None]


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("LlamaForCausalLM", llama_config, llama_config_to_hf, llama_from_hf, llama_to_hf,
                          _check_llama_shape),
    "gpt2": Architecture("GPT2LMHeadModel", gpt2_config, gpt2_config_to_hf, gpt2_from_hf, gpt2_to_hf,
                         _check_gpt2_shape),
}


def architecture_of(hf_config: dict[str, Any]) -> Architecture:
    model_type = hf_config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"Hugging Face model_type {model_type!r} is not supported: "
                         f"qkv converts {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[model_type]
