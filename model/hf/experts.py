"""The routed experts' tensors of the mixture-of-experts families (Mixtral, Qwen 3 MoE, OLMoE).

HF checkpoints keep one torch ``Linear`` per expert and projection ([out, in]) and the router as
``gate.weight`` [E, d]; qkv stacks them as ``router`` [L, d, E] and ``wg`` / ``wi`` [L, E, d, f], ``wo``
[L, E, f, d] (model/moe.py). Exact transposes both ways.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from ..config import ModelConfig
from .fields import Tensors

LAYER = "model.layers.{i}."


class ExpertNames(NamedTuple):
    """Per-layer tensor names: the router, and each expert's gate / up / down projections ({j}: the expert)."""

    router: str
    gate: str
    up: str
    down: str


QWEN_STYLE = ExpertNames("mlp.gate.weight", "mlp.experts.{j}.gate_proj.weight", "mlp.experts.{j}.up_proj.weight",
                         "mlp.experts.{j}.down_proj.weight")  # Qwen 3 MoE, OLMoE
MIXTRAL = ExpertNames("block_sparse_moe.gate.weight", "block_sparse_moe.experts.{j}.w1.weight",
                      "block_sparse_moe.experts.{j}.w3.weight", "block_sparse_moe.experts.{j}.w2.weight")


def params_from_hf(t: Tensors, cfg: ModelConfig, names: ExpertNames) -> dict[str, Any]:
    layers, experts = range(cfg.n_layers), range(cfg.n_experts)

    def stacked(name: str) -> np.ndarray:
        return np.stack([np.stack([t[(LAYER + name).format(i=i, j=j)].T for j in experts]) for i in layers])

    return {"router": np.stack([t[(LAYER + names.router).format(i=i)].T for i in layers]),
            "wg": stacked(names.gate), "wi": stacked(names.up), "wo": stacked(names.down)}


def params_to_hf(out: Tensors, mlp: dict[str, Any], cfg: ModelConfig, names: ExpertNames) -> None:
    for i in range(cfg.n_layers):
        out[(LAYER + names.router).format(i=i)] = mlp["router"][i].T
        for j in range(cfg.n_experts):
            for key, name in (("wg", names.gate), ("wi", names.up), ("wo", names.down)):
                out[(LAYER + name).format(i=i, j=j)] = mlp[key][i, j].T
