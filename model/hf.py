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
from qkv.errors import UserError

Tensors = dict[str, np.ndarray]


def _stack(tensors: Tensors, n_layers: int, name: str, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    return np.stack([fn(tensors[name.format(i=i)]) for i in range(n_layers)])


def _unstack(out: Tensors, stacked: np.ndarray, name: str, fn: Callable[[np.ndarray], np.ndarray]) -> None:
    """One entry per layer; reshapes and transposes stay views of ``stacked`` (copied only when written)."""
    for i, layer in enumerate(stacked):
        out[name.format(i=i)] = fn(layer)


# ---------------------------------------------------------------------------------------------
# config.json fields: every field is either mapped, required to have the value qkv computes, or known
# not to change a forward pass; an unknown field is refused, since it might change the math.

# Bookkeeping, token ids, dropout (off when converted), caching and old generation defaults.
INERT_FIELDS = frozenset("""
    architectures model_type transformers_version torch_dtype dtype use_cache initializer_range
    bos_token_id eos_token_id pad_token_id sep_token_id decoder_start_token_id unk_token_id
    id2label label2id problem_type tokenizer_class prefix finetuning_task task_specific_params
    return_dict output_attentions output_hidden_states torchscript chunk_size_feed_forward
    is_encoder_decoder is_decoder tie_encoder_decoder cross_attention_hidden_size pruned_heads
    max_length min_length do_sample early_stopping num_beams num_beam_groups diversity_penalty temperature
    top_k top_p typical_p repetition_penalty length_penalty no_repeat_ngram_size encoder_no_repeat_ngram_size
    bad_words_ids num_return_sequences output_scores return_dict_in_generate forced_bos_token_id
    forced_eos_token_id remove_invalid_values exponential_decay_length_penalty suppress_tokens
    begin_suppress_tokens
""".split())


def _check_fields(hf: dict[str, Any], arch: str, mapped: set[str], required: dict[str, tuple[Any, ...]]) -> None:
    """Refuse, naming the field, a config whose math qkv would not reproduce exactly."""
    for field, allowed in required.items():
        if field in hf and hf[field] not in allowed:
            raise UserError(f"config.json {field}={hf[field]!r} is not supported for {arch}: qkv computes only "
                            f"{field}={allowed[0]!r}, and a different value would give wrong logits")
    for field in hf:
        if field not in mapped and field not in required and field not in INERT_FIELDS and not field.startswith("_"):
            raise UserError(f"config.json field {field}={hf[field]!r} is unknown to qkv's {arch} converter and "
                            "might change the math: remove it from config.json if it does not")


ROPE_TYPES = ("default", "linear", "llama3")


def rope_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig RoPE fields from either transformers 5's ``rope_parameters`` or the older
    ``rope_theta`` + ``rope_scaling`` (whose rope type was once spelled ``type``)."""
    rope = dict(hf.get("rope_parameters") or {})
    field = "rope_parameters"
    if hf.get("rope_scaling"):  # its type wins over a rope_parameters' (which may say only its theta)
        base = {k: v for k, v in rope.items() if k not in ("rope_type", "type")}
        rope, field = {**base, **hf["rope_scaling"]}, "rope_scaling"
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise UserError(f"config.json {field} rope_type={kind!r} is not supported: qkv computes "
                        f"{', '.join(ROPE_TYPES)} RoPE exactly")
    if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UserError("config.json partial_rotary_factor is not supported: qkv rotates the whole head")
    out: dict[str, Any] = {"rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))}
    if kind != "default":
        if "factor" not in rope:
            raise UserError(f"config.json {field} lacks 'factor', which rope_type={kind!r} needs")
        out.update(rope_scaling=kind, rope_factor=float(rope["factor"]))
    if kind == "llama3":
        try:
            out.update(rope_low_freq_factor=float(rope["low_freq_factor"]),
                       rope_high_freq_factor=float(rope["high_freq_factor"]))
        except KeyError as err:
            raise UserError(f"config.json {field} lacks {err.args[0]!r}, which rope_type='llama3' needs") from None
        out["rope_original_max_len"] = int(rope.get("original_max_position_embeddings",
                                                    hf.get("max_position_embeddings", 2048)))
    known = {"rope_type", "type", "rope_theta", "factor", "partial_rotary_factor", "low_freq_factor",
             "high_freq_factor", "original_max_position_embeddings"}
    for key in rope:
        if key not in known:
            raise UserError(f"config.json {field} key {key!r} is unknown to qkv and might change the math")
    return out


def rope_fields_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """transformers 5's ``rope_parameters`` (plus the older top-level ``rope_theta``) of a config."""
    rope: dict[str, Any] = {"rope_type": "default" if cfg.rope_scaling == "none" else cfg.rope_scaling,
                            "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling != "none":
        rope["factor"] = cfg.rope_factor
    if cfg.rope_scaling == "llama3":
        rope.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_max_len)
    return {"rope_theta": cfg.rope_theta, "rope_parameters": rope}


# ---------------------------------------------------------------------------------------------
# Llama (LlamaForCausalLM): RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases

LLAMA_MAPPED = {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "intermediate_size", "max_position_embeddings", "rope_theta", "rope_parameters",
                "rope_scaling", "partial_rotary_factor", "rms_norm_eps", "tie_word_embeddings", "attention_dropout",
                "pretraining_tp"}  # pretraining_tp: transformers 5 no longer reads it (same math either way)


def llama_config(hf: dict[str, Any]) -> ModelConfig:
    _check_fields(hf, "Llama", LLAMA_MAPPED, {"hidden_act": ("silu",), "attention_bias": (False,),
                                              "mlp_bias": (False,)})
    n_heads = hf["num_attention_heads"]
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        d_ff=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 2048), positions="rope",
        norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), activation="swiglu",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), use_bias=False, **rope_fields(hf))


def llama_config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_size, "intermediate_size": cfg.d_ff,
        "max_position_embeddings": cfg.max_seq_len, **rope_fields_to_hf(cfg), "rms_norm_eps": cfg.norm_eps,
        "hidden_act": "silu", "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False,
        "mlp_bias": False, "torch_dtype": "float32",
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
        out["lm_head.weight"] = p["lm_head"].T
    return out


# ---------------------------------------------------------------------------------------------
# GPT-2 (GPT2LMHeadModel): learned positions, LayerNorm, GELU (tanh), biases, tied output


GPT2_MAPPED = {"vocab_size", "n_embd", "n_layer", "n_head", "n_inner", "n_positions", "n_ctx", "layer_norm_epsilon",
               "tie_word_embeddings", "attn_pdrop", "embd_pdrop", "resid_pdrop", "summary_type", "summary_use_proj",
               "summary_activation", "summary_proj_to_labels", "summary_first_dropout", "add_cross_attention",
               # float32 upcast only: the same math in the float32 qkv computes in
               "reorder_and_upcast_attn"}


def gpt2_config(hf: dict[str, Any]) -> ModelConfig:
    _check_fields(hf, "GPT-2", GPT2_MAPPED, {"activation_function": ("gelu_new", "gelu_pytorch_tanh"),
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


# qkv options that neither HF architecture has: export refuses them rather than dropping them
_QKV_ONLY = dict(qk_norm=False, logit_softcap=0.0)


def _require(cfg: ModelConfig, family: str, **wanted: Any) -> None:
    for key, value in {**wanted, **_QKV_ONLY}.items():
        if getattr(cfg, key) != value:
            raise UserError(f"{family} export needs model.{key}={value!r}, this model has {getattr(cfg, key)!r}")


def _check_gpt2_shape(cfg: ModelConfig) -> None:
    _require(cfg, "GPT-2", positions="learned", norm="layernorm", activation="gelu", use_bias=True,
             norm_position="pre")
    if cfg.num_kv_heads != cfg.n_heads or cfg.head_size * cfg.n_heads != cfg.d_model:
        raise UserError("GPT-2 export needs plain multi-head attention with head_size * n_heads == d_model")


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
    params = {"embed": t["wte.weight"], "pos_embed": t["wpe.weight"],
              "final_norm": {"scale": t["ln_f.weight"], "bias": t["ln_f.bias"]},
              "blocks": {"attn": attn, "attn_norm": norm("ln_1"), "mlp": mlp, "mlp_norm": norm("ln_2")}}
    if not cfg.tie_embeddings:
        params["lm_head"] = t["lm_head.weight"].T
    return params


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
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = p["lm_head"].T
    return out


def _check_llama_shape(cfg: ModelConfig) -> None:
    _require(cfg, "Llama", positions="rope", norm="rmsnorm", activation="swiglu", use_bias=False, norm_position="pre")


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
        raise UserError(f"Hugging Face model_type {model_type!r} is not supported: "
                        f"qkv converts {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[model_type]
