"""What a run learns: objectives as small pure functions, shared by the one train step (train/step.py).

An :class:`Objective` says, for one batch in the batch contract (``inputs``, ``targets``,
``loss_mask``, ...):

  loss(graphdef, params, reference, batch, key)  -> (summed loss, {metric: sum})   traced, differentiated
  normalizer(batch)                              -> what the sums are divided by (whole batch, before
                                                    micro-batching, so micro-batch gradients simply add up)
  evaluate(graphdef, params, reference, batch)   -> {name: sum}   summed over evaluation batches...
  summarize(totals)                              -> {name: float} ...and divided once, on the host
  prepare(batch, key)                            -> the batch as the model sees it (MLM masking), or None

``reference`` is the frozen tree a run passes next to its trainable state (the DPO reference model;
None for the others). The objectives, one per job:

  lm        next-token prediction (decoder pretraining)
  mlm       masked tokens, masked on the device each step (encoder pretraining, train/mlm.py)
  seq2seq   the target given the source, teacher-forced (encoder-decoder pretraining)
  sft       response tokens only (``loss_mask`` marks them; data/sft.py)
  classify  one label per example (targets [B, 1])
  dpo       −log σ(β[(π_c − π_ref,c) − (π_r − π_ref,r)]) per (chosen, rejected) pair of adjacent rows

All but DPO are token cross-entropy over ``loss_mask``: every model family maps a batch to logits
aligned with ``batch["targets"]`` (``forward_batch``). Pretraining objectives take the optimizer's
z-loss and label smoothing; fine-tuning objectives use plain cross-entropy.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from qkv.data.tokenizer import MASK_ID
from qkv.model import moe_stats
from qkv.model.loss import batch_token_losses, target_is_top, token_losses

from .mlm import mlm_corrupt

Batch = dict[str, jax.Array]


def forward_loss_sum(graphdef: nnx.GraphDef, params: Any, batch: Batch, dropout_key: jax.Array | None,
                     z_loss: float = 0.0, label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(sum of masked token losses, number of target tokens, number whose target is the top logit) for one batch."""
    return model_loss_sum(nnx.merge(graphdef, params), batch, dropout_key, z_loss, label_smoothing)


def model_loss_sum(model: nnx.Module, batch: Batch, dropout_key: jax.Array | None, z_loss: float = 0.0,
                   label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``forward_loss_sum`` of a merged model (its MoE layers keep their router statistics: ``router_losses``)."""
    losses, hits = batch_token_losses(model, batch, dropout_key, z_loss, label_smoothing)
    mask = batch["loss_mask"].astype(jnp.float32)  # (the loss is chunked over the sequence: model/loss.py)
    return jnp.sum(losses * mask), jnp.sum(mask), jnp.sum(hits * mask)


def sequence_logps(graphdef: nnx.GraphDef, params: Any, batch: Batch,
                   dropout_key: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(summed log-probability of each row's loss-masked targets [B], their count [B], how many of them
    are the top logit [B]); targets are response tokens (SFT, DPO) or the row's class (classify)."""
    return model_sequence_logps(nnx.merge(graphdef, params), batch, dropout_key)


def model_sequence_logps(model: nnx.Module, batch: Batch, dropout_key: jax.Array | None):
    logits = model.forward_batch(batch, dropout_key)
    mask = batch["loss_mask"].astype(jnp.float32)
    correct = jnp.sum(target_is_top(logits, batch["targets"]) * mask, axis=-1)
    return -jnp.sum(token_losses(logits, batch["targets"]) * mask, axis=-1), jnp.sum(mask, axis=-1), correct


def router_losses(model: nnx.Module, count: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(the weighted router losses times ``count``, metric sums) of the forward pass ``model`` just ran; (0, {})
    for a model without experts (model/moe.py). Times ``count`` (the micro-batch's loss tokens) because the
    train step divides every sum by the batch's tokens: the losses then enter as token-weighted means, and
    micro-batches add up. Metrics: the unweighted load-balancing and z-losses, each expert's share of the
    (token, expert) assignments (``moe_share_e<i>``) and the share dropped by capacity."""
    stats = moe_stats(model)
    if stats is None:
        return jnp.float32(0.0), {}
    cfg = model.cfg
    extra = cfg.router_aux_loss_weight * stats["aux_loss"] + cfg.router_z_loss_weight * stats["z_loss"]
    sums = {"moe_aux_loss": stats["aux_loss"], "moe_z_loss": stats["z_loss"], "moe_dropped": stats["dropped"],
            **{f"moe_share_e{i}": share for i, share in enumerate(stats["expert_share"])}}
    return count * extra, {k: count * v for k, v in sums.items()}


def dpo_terms(policy_logps: jax.Array, reference_logps: jax.Array, beta: float) -> dict[str, jax.Array]:
    """Per-pair DPO quantities from per-row summed log-probs with rows (chosen, rejected) interleaved."""
    reward_c = beta * (policy_logps[0::2] - reference_logps[0::2])
    reward_r = beta * (policy_logps[1::2] - reference_logps[1::2])
    margin = reward_c - reward_r
    return {"loss": -jax.nn.log_sigmoid(margin), "reward_chosen": reward_c, "reward_rejected": reward_r,
            "reward_margin": margin, "reward_accuracy": (margin > 0).astype(jnp.float32)}


DPO_METRICS = ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy")


@dataclass(frozen=True)
class Objective:
    name: str
    loss: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
    normalizer: Callable[[Batch], jax.Array]
    evaluate: Callable[..., dict[str, jax.Array]]
    summarize: Callable[[dict[str, float]], dict[str, float]]
    prepare: Callable[[Batch, jax.Array], Batch] | None = None
    metrics: tuple[str, ...] = field(default=())  # training metrics besides loss (summed like it)


# ------------------------------------------------------------------------ token cross-entropy


def loss_tokens(batch: Batch) -> jax.Array:
    return jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)


def _token_loss(graphdef, params, reference, batch, key, *, z_loss: float, label_smoothing: float):
    del reference
    model = nnx.merge(graphdef, params)
    loss_sum, count, _ = model_loss_sum(model, batch, key, z_loss, label_smoothing)
    extra, sums = router_losses(model, count)
    return loss_sum + extra, sums


def _token_eval(graphdef, params, reference, batch):
    del reference
    loss_sum, count, correct = forward_loss_sum(graphdef, params, batch, None)
    out = {"loss_sum": loss_sum, "tokens": count, "correct": correct}
    if "target_bytes" in batch:  # text: UTF-8 bytes of each counted target (tasks.with_target_bytes), for bits/byte
        out["bytes"] = jnp.sum(batch["target_bytes"])
    return out


def _token_summary(totals: dict[str, float]) -> dict[str, float]:
    """Loss, perplexity and accuracy (the target is the top logit) over the target tokens (or labels)."""
    tokens = max(totals.get("tokens", 0.0), 1.0)
    loss = totals.get("loss_sum", 0.0) / tokens
    out = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "accuracy": totals.get("correct", 0.0) / tokens,
           "tokens": totals.get("tokens", 0.0)}
    if totals.get("bytes"):  # bits per byte: the summed loss in bits over the UTF-8 bytes of the evaluated text
        out.update(bits_per_byte=totals["loss_sum"] / math.log(2) / totals["bytes"], bytes=totals["bytes"])
    return out


def cross_entropy(name: str, z_loss: float = 0.0, label_smoothing: float = 0.0,
                  prepare: Callable[[Batch, jax.Array], Batch] | None = None) -> Objective:
    """Token cross-entropy over ``loss_mask``, normalised by the batch's loss-counted tokens."""
    return Objective(name, functools.partial(_token_loss, z_loss=z_loss, label_smoothing=label_smoothing),
                     loss_tokens, _token_eval, _token_summary, prepare)


def lm(z_loss: float = 0.0, label_smoothing: float = 0.0) -> Objective:
    return cross_entropy("lm", z_loss, label_smoothing)


def mlm(vocab_size: int, z_loss: float = 0.0, label_smoothing: float = 0.0) -> Objective:
    return cross_entropy("mlm", z_loss, label_smoothing,
                         functools.partial(mlm_corrupt, mask_id=MASK_ID, vocab_size=vocab_size))


def seq2seq(z_loss: float = 0.0, label_smoothing: float = 0.0) -> Objective:
    return cross_entropy("seq2seq", z_loss, label_smoothing)


def _sequence_loss(graphdef, params, reference, batch, key):
    del reference
    model = nnx.merge(graphdef, params)
    logps, counts, _ = model_sequence_logps(model, batch, key)
    extra, sums = router_losses(model, jnp.sum(counts))
    return -jnp.sum(logps) + extra, sums


def _sequence_eval(graphdef, params, reference, batch):
    del reference
    logps, counts, correct = sequence_logps(graphdef, params, batch, None)
    return {"loss_sum": -jnp.sum(logps), "tokens": jnp.sum(counts), "correct": jnp.sum(correct)}


def sft() -> Objective:
    """Plain cross-entropy over the response tokens (summed per example first, as DPO's log-probs are)."""
    return Objective("sft", _sequence_loss, loss_tokens, _sequence_eval, _token_summary)


def classify() -> Objective:
    """Plain cross-entropy of each example's label (targets [B, 1])."""
    return Objective("classify", _sequence_loss, loss_tokens, _sequence_eval, _token_summary)


# ------------------------------------------------------------------------ DPO


def _dpo_loss(graphdef, params, reference, batch, key, *, beta: float):
    model = nnx.merge(graphdef, params)
    policy = model_sequence_logps(model, batch, key)[0]
    ref = jax.lax.stop_gradient(sequence_logps(graphdef, reference, batch, None)[0])
    terms = dpo_terms(policy, ref, beta)
    valid = (jnp.sum(batch["loss_mask"][0::2], axis=-1) > 0).astype(jnp.float32)
    sums = {k: jnp.sum(v * valid) for k, v in terms.items()}
    extra, moe_sums = router_losses(model, jnp.sum(valid))  # DPO's sums are per pair
    return sums.pop("loss") + extra, {**sums, **moe_sums}


def _dpo_eval(graphdef, params, reference, batch, *, beta: float):
    logps, counts, _ = sequence_logps(graphdef, params, batch, None)
    terms = dpo_terms(logps, sequence_logps(graphdef, reference, batch, None)[0], beta)
    valid = (counts[0::2] > 0).astype(jnp.float32)
    return {**{k: jnp.sum(v * valid) for k, v in terms.items()}, "pairs": jnp.sum(valid),
            "chosen_nll": -jnp.sum(logps[0::2] * valid), "chosen_tokens": jnp.sum(counts[0::2] * valid)}


def _dpo_summary(totals: dict[str, float]) -> dict[str, float]:
    """DPO loss, rewards and reward accuracy per pair, and the perplexity of the chosen responses."""
    pairs = max(totals.get("pairs", 0.0), 1.0)
    nll = totals.get("chosen_nll", 0.0) / max(totals.get("chosen_tokens", 0.0), 1.0)
    return {"loss": totals.get("loss", 0.0) / pairs, **{k: totals.get(k, 0.0) / pairs for k in DPO_METRICS},
            "perplexity": math.exp(min(nll, 50.0)), "pairs": totals.get("pairs", 0.0)}


def dpo(beta: float) -> Objective:
    """Rows are (chosen, rejected) pairs; sums are normalised by the batch's pair count."""
    return Objective("dpo", functools.partial(_dpo_loss, beta=beta),
                     lambda batch: jnp.float32(batch["inputs"].shape[0] // 2),
                     functools.partial(_dpo_eval, beta=beta), _dpo_summary, metrics=DPO_METRICS)
