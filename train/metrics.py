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


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 × (matmul parameters) + causal attention scores and values.

    Forward is 2 FLOPs per multiply-add, backward twice that, hence 6·N. N counts every weight used in
    a matmul, including the output projection even when it is tied to the embedding (the lookup is
    free, the projection is not), but not position or embedding lookups. Attention adds QKᵀ and P·V:
    per token and head each costs 2·T·E FLOPs forward over T keys, the causal mask halves the average
    key count, and backward doubles the forward: 3 × 2 × 2·T·E / 2 = 6·T·E per head and layer.
    """
    d, h, k, e, f = cfg.d_model, cfg.n_heads, cfg.num_kv_heads, cfg.head_size, cfg.d_ff
    attn_weights = d * h * e * 2 + d * k * e * 2  # q, o and k, v projections
    mlp_weights = d * f * (3 if cfg.activation == "swiglu" else 2)
    matmul_params = cfg.n_layers * (attn_weights + mlp_weights) + d * cfg.vocab_size
    attention = 6 * cfg.n_layers * h * e * seq_len  # 12·L·H·E·T per token, halved by causality
    return 6.0 * matmul_params + attention


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
