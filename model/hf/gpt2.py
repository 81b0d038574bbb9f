"""GPT-2 (GPT2LMHeadModel): learned positions, LayerNorm, GELU (tanh), biases, a tied output.

GPT-2's ``Conv1D`` stores weights as [in, out] with q, k and v fused on the output axis.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ..config import ModelConfig
from .fields import Architecture, Tensors, check_fields, stack, unstack

# ---------------------------------------------------------------------------------------------
# GPT-2 (GPT2LMHeadModel): learned positions, LayerNorm, GELU (tanh), biases, tied output


GPT2_MAPPED = {"vocab_size", "n_embd", "n_layer", "n_head", "n_inner", "n_positions", "n_ctx", "layer_norm_epsilon",
               "tie_word_embeddings", "attn_pdrop", "embd_pdrop", "resid_pdrop", "summary_type", "summary_use_proj",
               "summary_activation", "summary_proj_to_labels", "summary_first_dropout", "add_cross_attention",
               # float32 upcast only: the same math in the float32 qkv computes in
               "reorder_and_upcast_attn"}


def gpt2_config(hf: dict[str, Any]) -> ModelConfig:
    check_fields(hf, "GPT-2", GPT2_MAPPED, {"activation_function": ("gelu_new", "gelu_pytorch_tanh"),
                                             "scale_attn_weights": (True,),
                                             "scale_attn_by_inverse_layer_idx": (False,)})
    d = hf["n_embd"]
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["n_layer"], n_heads=hf["n_head"],
        d_ff=hf.get("n_inner") or 4 * d, max_seq_len=hf["n_positions"], positions="learned", norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), activation="gelu", use_bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)))


def gpt2_config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
        "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.d_ff,
        "n_positions": cfg.max_seq_len, "layer_norm_epsilon": cfg.norm_eps, "activation_function": "gelu_new",
        "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": "float32",
    }


def gpt2_from_hf(t: Tensors, cfg: ModelConfig) -> dict[str, Any]:
    d, h, e, n = cfg.d_model, cfg.n_heads, cfg.head_size, cfg.n_layers
    t = {k.removeprefix("transformer."): v for k, v in t.items()}
    layer = "h.{i}."

    def qkv_part(i: int, bias: bool) -> Callable[[np.ndarray], np.ndarray]:
        if bias:
            return lambda b: b[i * d:(i + 1) * d].reshape(h, e)
        return lambda w: w[:, i * d:(i + 1) * d].reshape(d, h, e)  # Conv1D stores [in, out]

    def norm(name: str) -> dict[str, np.ndarray]:
        return {"scale": stack(t, n, layer + name + ".weight", lambda w: w),
                "bias": stack(t, n, layer + name + ".bias", lambda w: w)}

    attn = {f"w{c}": stack(t, n, layer + "attn.c_attn.weight", qkv_part(i, False)) for i, c in enumerate("qkv")}
    attn.update({f"b{c}": stack(t, n, layer + "attn.c_attn.bias", qkv_part(i, True)) for i, c in enumerate("qkv")})
    attn["wo"] = stack(t, n, layer + "attn.c_proj.weight", lambda w: w.reshape(h, e, d))
    attn["bo"] = stack(t, n, layer + "attn.c_proj.bias", lambda w: w)
    mlp = {"wi": stack(t, n, layer + "mlp.c_fc.weight", lambda w: w),
           "bi": stack(t, n, layer + "mlp.c_fc.bias", lambda w: w),
           "wo": stack(t, n, layer + "mlp.c_proj.weight", lambda w: w),
           "bo": stack(t, n, layer + "mlp.c_proj.bias", lambda w: w)}
    params = {"embed": t["wte.weight"], "pos_embed": t["wpe.weight"],
              "final_norm": {"scale": t["ln_f.weight"], "bias": t["ln_f.bias"]},
              "blocks": {"attn": attn, "attn_norm": norm("ln_1"), "mlp": mlp, "mlp_norm": norm("ln_2")}}
    if not cfg.tie_embeddings:
        params["lm_head"] = t["lm_head.weight"].T
    return params


def gpt2_to_hf(p: dict[str, Any], cfg: ModelConfig) -> Tensors:
    d = cfg.d_model
    b, layer = p["blocks"], "transformer.h.{i}."
    out = {"transformer.wte.weight": p["embed"], "transformer.wpe.weight": p["pos_embed"],
           "transformer.ln_f.weight": p["final_norm"]["scale"], "transformer.ln_f.bias": p["final_norm"]["bias"]}
    fused_w = np.concatenate([b["attn"][f"w{c}"].reshape(cfg.n_layers, d, d) for c in "qkv"], axis=-1)
    fused_b = np.concatenate([b["attn"][f"b{c}"].reshape(cfg.n_layers, d) for c in "qkv"], axis=-1)
    unstack(out, fused_w, layer + "attn.c_attn.weight", lambda w: w)
    unstack(out, fused_b, layer + "attn.c_attn.bias", lambda w: w)
    unstack(out, b["attn"]["wo"], layer + "attn.c_proj.weight", lambda w: w.reshape(d, d))
    unstack(out, b["attn"]["bo"], layer + "attn.c_proj.bias", lambda w: w)
    for name, key in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
        unstack(out, b[key]["scale"], layer + name + ".weight", lambda w: w)
        unstack(out, b[key]["bias"], layer + name + ".bias", lambda w: w)
    for name, key in (("c_fc.weight", "wi"), ("c_fc.bias", "bi"), ("c_proj.weight", "wo"), ("c_proj.bias", "bo")):
        unstack(out, b["mlp"][key], layer + "mlp." + name, lambda w: w)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = p["lm_head"].T
    return out


ARCH = Architecture("gpt2", "GPT2LMHeadModel", "gpt2", gpt2_config, gpt2_config_to_hf, gpt2_from_hf, gpt2_to_hf)
