"""Where numbers go: a JSONL file and TensorBoard event files in the run directory (process 0 only),
plus the analytic FLOP count behind TFLOP/s and MFU figures.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax

from qkv.model import ModelConfig
from qkv.model.moe import expert_params_per_layer


def flops_per_token(cfg: ModelConfig, seq_len: int, source_len: int | None = None) -> float:
    """Training FLOPs per (target) token: 6 × (matmul parameters) + attention scores and values.

    A mixture-of-experts MLP counts its ACTIVE weights: the router, the k routed experts and the shared
    experts each token passes through (model/moe.py), not the experts it skips.

    Forward is 2 FLOPs per multiply-add, backward twice that, hence 6·N. N counts every weight used in
    a matmul, including the output projection even when it is tied to the embedding (the lookup is
    free, the projection is not), but not position or embedding lookups. Attention adds QKᵀ and P·V:
    per token and head each costs 2·T·E FLOPs forward over T keys, and backward doubles the forward:
    12·T·E per head and layer, halved to 6·T·E by a causal mask (decoders); a sliding-window layer
    (``model.sliding_window`` W) sees about W keys per query instead of T/2.

    Encoder-decoder rows hold ``source_len`` (default ``seq_len``) source tokens per ``seq_len`` target
    tokens: the encoder's work on the source (bidirectional), the decoder's causal self-attention, and
    cross-attention (queries and output from the target, keys and values projected from the source,
    every target token attending to all source tokens) are summed per row and divided by ``seq_len``.
    """
    d, h, k, e, f = cfg.d_model, cfg.n_heads, cfg.num_kv_heads, cfg.head_size, cfg.d_ff
    attn_weights = d * h * e * 2 + d * k * e * 2  # q, o and k, v projections
    mlp_weights = d * f * (3 if cfg.activation in ("swiglu", "geglu") else 2)
    if cfg.n_experts:  # active parameters only: the router, the k experts a token is sent to, the shared experts
        mlp_weights = d * cfg.n_experts + (cfg.n_experts_per_token + cfg.n_shared_experts) * expert_params_per_layer(cfg)
    layer_weights = attn_weights + mlp_weights
    head = d * cfg.vocab_size
    if cfg.kind == "decoder":  # keys per query: T/2 under a causal mask, about W on a sliding layer of window W
        keys = sum(_sliding_keys(cfg.sliding_window, seq_len) if sliding else seq_len / 2
                   for sliding in cfg.layer_is_sliding())
        return 6.0 * (cfg.n_layers * layer_weights + head) + 12 * h * e * keys
    if cfg.kind == "encoder":
        head = d * cfg.n_classes / seq_len if cfg.n_classes else head  # a class head reads one pooled vector
        return 6.0 * (cfg.n_layers * layer_weights + head) + 12 * cfg.n_layers * h * e * seq_len
    s, t, le, ld = source_len or seq_len, seq_len, cfg.encoder_layers, cfg.n_layers
    encoder = s * (6.0 * le * layer_weights + 12 * le * h * e * s)
    cross_kv = s * 6.0 * ld * d * k * e * 2
    decoder = t * (6.0 * (ld * (layer_weights + d * h * e * 2) + head) + 6 * ld * h * e * t + 12 * ld * h * e * s)
    return (encoder + cross_kv + decoder) / t


def _sliding_keys(window: int, seq_len: int) -> float:
    """Mean keys a query sees over T positions with a causal sliding window W: min(i + 1, W) averaged."""
    w = min(window, seq_len)
    return w - w * (w - 1) / (2 * seq_len)


class MetricsWriter:
    """Appends one JSON object per record to metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: str | Path):
        self.enabled = jax.process_index() == 0
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            from tensorboardX import SummaryWriter  # writes event files without TensorFlow

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def write(self, step: int, values: dict[str, Any], prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": prefix, "time": time.time(), **{k: float(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in values.items():
            self._tb.add_scalar(f"{prefix}/{key}", float(value), step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
