"""qkv.model: Transformer language models as Flax NNX modules, used functionally.

``create_model`` builds a model from a ``ModelConfig`` through one registry keyed by
``ModelConfig.kind`` (decoder, encoder, encoder_decoder: model/transformer.py, model/encoder.py); ``split_params`` / ``logical_axes`` give the pure parameter tree and its
logical axis names. The model takes arrays and knows nothing of data, training or devices.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx

from .attention import attention_mask, dot_product_attention, reference_attention
from .config import ModelConfig
from .encoder import Encoder, EncoderDecoder
from .moe import MoeMlp, inactive_params, moe_stats
from .transformer import Cache, Transformer, init_cache

# The one place that maps ``model.kind`` to a family; everything else asks the model (forward_batch).
MODEL_REGISTRY: dict[str, Callable[[ModelConfig, nnx.Rngs], nnx.Module]] = {
    "decoder": Transformer,
    "encoder": Encoder,
    "encoder_decoder": EncoderDecoder,
}


def create_model(cfg: ModelConfig, seed: int = 0) -> nnx.Module:
    """A freshly initialised model of the family named by ``cfg.kind``."""
    return MODEL_REGISTRY[cfg.kind](cfg, nnx.Rngs(params=seed))


def abstract_model(cfg: ModelConfig) -> nnx.Module:
    """The model with ShapeDtypeStruct leaves: shapes and metadata without allocating memory."""
    return nnx.eval_shape(lambda: create_model(cfg))


def split_params(model: nnx.Module) -> tuple[nnx.GraphDef, dict[str, Any]]:
    """(graphdef, params) with params a plain nested dict of arrays: what training and Orbax see."""
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_pure_dict(state)


def param_metadata(model: nnx.Module, name: str) -> dict[str, Any]:
    """A tree matching ``split_params(model)[1]`` holding each parameter's ``name`` metadata."""
    return nnx.to_pure_dict(nnx.state(model), extract_fn=lambda v: v.get_metadata()[name])


def logical_axes(model: nnx.Module) -> dict[str, Any]:
    """Each parameter's logical axis names, e.g. ``("layers", "embed", "mlp")``."""
    return param_metadata(model, "axes")


def count_params(params: Any) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))


__all__ = [
    "MODEL_REGISTRY", "Cache", "Encoder", "EncoderDecoder", "ModelConfig", "MoeMlp", "inactive_params", "moe_stats", "Transformer", "abstract_model", "attention_mask", "count_params",
    "create_model", "dot_product_attention", "init_cache", "logical_axes", "param_metadata", "reference_attention", "split_params",
]
