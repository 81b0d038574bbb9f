"""What every family shares: the config.json field rule, RoPE fields, layer stacking, and the export check.

A config.json field is either mapped onto a ``ModelConfig`` field, required to have the value qkv computes,
or known not to change a forward pass (``INERT_FIELDS``); anything else is refused by name, since it might
change the math. Export runs the same mapping backwards and then forwards again: a run whose
configuration does not come back unchanged (``check_holds``) holds something the family cannot express,
and is refused naming that field, rather than silently dropped.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
from qkv.errors import UserError

from ..config import ModelConfig
from ..layers import rope_frequencies

Tensors = dict[str, np.ndarray]


def stack(tensors: Tensors, n_layers: int, name: str, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    return np.stack([fn(tensors[name.format(i=i)]) for i in range(n_layers)])


def unstack(out: Tensors, stacked: np.ndarray, name: str, fn: Callable[[np.ndarray], np.ndarray]) -> None:
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


def check_fields(hf: dict[str, Any], arch: str, mapped: set[str], required: dict[str, tuple[Any, ...]]) -> None:
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


HF_LAYER_TYPES = {"full_attention": "full", "sliding_attention": "sliding"}


def layer_types_from_hf(values: Any, n_layers: int) -> tuple[str, ...]:
    """qkv's ``model.layer_types`` from config.json's ``layer_types``, refusing kinds qkv does not compute."""
    if not isinstance(values, list) or len(values) != n_layers:
        raise UserError(f"config.json layer_types={values!r} must list one type per layer ({n_layers})")
    for value in values:
        if value not in HF_LAYER_TYPES:
            raise UserError(f"config.json layer_types entry {value!r} is not supported: qkv computes "
                            f"{', '.join(HF_LAYER_TYPES)} layers")
    return tuple(HF_LAYER_TYPES[v] for v in values)


def layer_types_to_hf(cfg: ModelConfig) -> list[str]:
    return ["sliding_attention" if s else "full_attention" for s in cfg.layer_is_sliding()]


def sliding_layers(hf: dict[str, Any]) -> dict[str, Any]:
    """Qwen 2 / 3's optional windows: ``use_sliding_window`` turns ``sliding_window`` on for the layers that
    ``layer_types`` (or, without it, ``max_window_layers`` onwards) names sliding."""
    n = hf["num_hidden_layers"]
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    if hf.get("layer_types") is not None:
        types = layer_types_from_hf(hf["layer_types"], n)
    else:
        start = hf.get("max_window_layers", 28)
        types = tuple("sliding" if window is not None and i >= start else "full" for i in range(n))
    if window is None or "sliding" not in types:
        return {}
    return {"sliding_window": int(window), "layer_types": types}


def sliding_layers_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    on = any(cfg.layer_is_sliding())
    return {"use_sliding_window": on, "sliding_window": cfg.sliding_window if on else None,
            "max_window_layers": cfg.n_layers, "layer_types": layer_types_to_hf(cfg)}


@dataclasses.dataclass(frozen=True)
class Architecture:
    """How one HF architecture maps to qkv: configs both ways and parameters both ways."""

    name: str  # the short family name (--arch qwen3), also accepted: hf_name
    hf_name: str  # the transformers class, e.g. Qwen3ForCausalLM
    model_type: str  # config.json model_type
    config_from_hf: Callable[[dict[str, Any]], ModelConfig]
    config_to_hf: Callable[[ModelConfig], dict[str, Any]]
    params_from_hf: Callable[[Tensors, ModelConfig], dict[str, Any]]
    params_to_hf: Callable[[dict[str, Any], ModelConfig], Tensors]

    def check(self, cfg: ModelConfig) -> None:
        check_holds(self, cfg)


# Fields that do not change what the model computes from its parameters (numerics, memory, training only),
# and raw fields compared through what they mean (head_size, num_kv_heads, sliding layers, RoPE frequencies).
_NOT_COMPARED = {"dtype", "param_dtype", "remat", "scan_layers", "attention_impl", "loss_chunk", "init_std", "dropout",
                 "n_encoder_layers", "n_classes", "pooling", "kind", "head_dim", "n_kv_heads", "sliding_window",
                 "layer_types", "rope_theta", "rope_scaling", "rope_factor", "rope_low_freq_factor",
                 "rope_high_freq_factor", "rope_original_max_len", "rope_local_theta",
                 "router_aux_loss_weight", "router_z_loss_weight"}  # training-only: no forward pass changes


def _meaning(cfg: ModelConfig) -> dict[str, Any]:
    sliding = cfg.layer_is_sliding()
    out = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in _NOT_COMPARED}
    out.update(head_size=cfg.head_size, n_kv_heads=cfg.num_kv_heads, layer_types=sliding,
               sliding_window=cfg.sliding_window if any(sliding) else 0)
    if cfg.positions == "rope":
        out["rope_theta"] = tuple(rope_frequencies(cfg).round(12))
        local = any(sliding) and cfg.rope_local_theta
        out["rope_local_theta"] = cfg.rope_local_theta if local else 0.0
    return out


def check_holds(arch: Architecture, cfg: ModelConfig) -> None:
    """Refuse, naming the field, a run that ``arch`` cannot hold exactly (its shape, kind or a feature)."""
    if cfg.kind != "decoder":
        raise UserError(f"{arch.hf_name} is a causal (decoder-only) language model and this run is "
                        f"model.kind={cfg.kind}: exporting it would drop its "
                        f"{'bidirectional attention' if cfg.kind == 'encoder' else 'encoder and cross-attention'}; "
                        "qkv exports decoder runs only")
    try:
        back = arch.config_from_hf(arch.config_to_hf(cfg))
    except UserError as err:
        raise UserError(f"{arch.hf_name} cannot hold this run: {err}") from None
    want, got = _meaning(cfg), _meaning(back)
    if cfg.qk_norm == "rms" and got["qk_norm"] == "head":  # scale-free per-head QK-norm: unit scales hold it
        got["qk_norm"] = "rms"
    for key, value in want.items():
        if got[key] != value:
            shown = {"layer_types": "sliding layers", "rope_theta": "RoPE frequencies"}.get(key, f"model.{key}")
            raise UserError(f"{arch.hf_name} cannot hold {shown}={_short(value)} (it would come back as "
                            f"{_short(got[key])}): choose another --arch{_hint(cfg)}, or train without it")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 60 else text[:57] + "..."


def _hint(cfg: ModelConfig) -> str:
    return " (qwen3 holds model.qk_norm=rms with unit scales)" if cfg.qk_norm == "rms" else ""
