"""The pure training and evaluation steps, and the sharded train state they run on.

State is a plain dict ``{"params", "opt_state", "step"}`` of arrays (what Orbax saves). Steps are
compiled once with ``jax.jit`` using in/out shardings derived from the logical-axis rules, with the
state donated so parameters and optimizer moments are updated in place.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from qkv.model import ModelConfig, abstract_model, create_model, logical_axes, param_metadata, split_params
from qkv.model.loss import batch_token_losses, token_losses  # noqa: F401 (token_losses: used by finetune, tests)

from .config import OptimConfig
from .sharding import activation_layout, batch_sharding, replicated, tree_shardings

State = dict[str, Any]
Batch = dict[str, jax.Array]
PREPARE_KEY = 1 << 30  # folded into a step's key for batch preparation; micro-batches use 0, 1, ...


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup, 1)
    peak, final = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(peak, final, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def make_optimizer(cfg: OptimConfig, total_steps: int, decay_mask: Any) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW; ``decay_mask`` (True per weight matrix) spares norms and biases."""
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    parts.append(optax.adamw(learning_rate_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts)


def forward_loss_sum(graphdef: nnx.GraphDef, params: Any, batch: Batch, dropout_key: jax.Array | None,
                     z_loss: float = 0.0, label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(sum of masked token losses, number of target tokens, number predicted right by argmax) for one batch.

    Every model family maps a batch to logits aligned with ``batch["targets"]`` (``forward_batch``):
    next tokens (decoder), masked tokens (encoder MLM), classes (encoder classifier, targets [B, 1]),
    target tokens given the source (encoder-decoder).
    """
    losses, hits = batch_token_losses(nnx.merge(graphdef, params), batch, dropout_key, z_loss, label_smoothing)
    mask = batch["loss_mask"].astype(jnp.float32)  # (the loss is chunked over the sequence: model/loss.py)
    return jnp.sum(losses * mask), jnp.sum(mask), jnp.sum(hits * mask)


def abstract_params(model_cfg: ModelConfig, mesh: Mesh, rules: dict[str, Any]) -> tuple[nnx.GraphDef, Any, Any]:
    """(graphdef, params as ShapeDtypeStructs carrying their shardings, the model's weight-decay mask)."""
    abstract = abstract_model(model_cfg)
    graphdef, shapes = split_params(abstract)
    shardings = tree_shardings(logical_axes(abstract), shapes, mesh, rules)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)
    return graphdef, params, param_metadata(abstract, "weight_decay")


def abstract_train_state(tx: optax.GradientTransformation, params: Any, mesh: Mesh) -> tuple[dict, dict]:
    """(shardings, ShapeDtypeStructs) of the train state {params, opt_state, step} for ``params``
    (ShapeDtypeStructs carrying their shardings): optimizer moments shard like their parameters,
    counters and the step are replicated."""
    param_shardings = jax.tree.map(lambda a: a.sharding, params)
    abstract_opt = jax.eval_shape(tx.init, params)
    opt_shardings = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_shardings,
                                          transform_non_params=lambda _: replicated(mesh))
    shardings = {"params": param_shardings, "opt_state": opt_shardings, "step": replicated(mesh)}
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            {"params": params, "opt_state": abstract_opt, "step": jax.ShapeDtypeStruct((), jnp.int32)},
                            shardings)
    return shardings, abstract


@dataclass
class Trainer:
    """Everything needed to build, shard and step one model; created once per run."""

    model_cfg: ModelConfig
    optim_cfg: OptimConfig
    mesh: Mesh
    rules: dict[str, Any]
    total_steps: int
    seed: int = 0
    # on-device batch preparation inside the compiled steps, e.g. MLM masking (train/tasks.py); None: as is
    prepare: Callable[[Batch, jax.Array], Batch] | None = None

    def __post_init__(self) -> None:
        self.prepare = self.prepare or (lambda batch, key: batch)
        self.graphdef, params, decay_mask = abstract_params(self.model_cfg, self.mesh, self.rules)
        self.tx = make_optimizer(self.optim_cfg, self.total_steps, decay_mask)
        self.state_shardings, self.abstract_state = abstract_train_state(self.tx, params, self.mesh)
        self.param_shardings = self.state_shardings["params"]
        self.batch_sharding = batch_sharding(self.mesh, self.rules)
        self.train_step = jax.jit(self._train_step, in_shardings=(self.state_shardings, self.batch_sharding),
                                  out_shardings=(self.state_shardings, replicated(self.mesh)), donate_argnums=0)
        self.eval_step = jax.jit(self._eval_step, in_shardings=(self.param_shardings, self.batch_sharding),
                                 out_shardings=replicated(self.mesh))

    def init_state(self) -> State:
        """Fresh parameters and optimizer state, created directly in their shards."""
        def init() -> State:
            _, params = split_params(create_model(self.model_cfg, self.seed))
            return {"params": params, "opt_state": self.tx.init(params), "step": jnp.int32(0)}

        return jax.jit(init, out_shardings=self.state_shardings)()

    def _train_step(self, state: State, batch: Batch) -> tuple[State, dict[str, jax.Array]]:
        with activation_layout(self.mesh, self.rules):  # the model's layout hints apply while tracing
            return self._train_step_body(state, batch)

    def _train_step_body(self, state: State, batch: Batch) -> tuple[State, dict[str, jax.Array]]:
        accum = self.optim_cfg.grad_accum
        step_key = jax.random.fold_in(jax.random.key(self.seed), state["step"])
        batch = self.prepare(batch, jax.random.fold_in(step_key, PREPARE_KEY))
        n_tokens = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
        micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

        def micro_grads(carry, xs):
            micro_batch, i = xs
            def loss_fn(params):
                loss_sum, _, _ = forward_loss_sum(self.graphdef, params, micro_batch, jax.random.fold_in(step_key, i),
                                                  self.optim_cfg.z_loss, self.optim_cfg.label_smoothing)
                return loss_sum / n_tokens  # normalised by the whole batch, so micro-grads simply add up
            loss, grads = jax.value_and_grad(loss_fn)(state["params"])
            return jax.tree.map(jnp.add, carry, (loss, grads)), None

        zeros = (jnp.float32(0.0), jax.tree.map(jnp.zeros_like, state["params"]))
        (loss, grads), _ = jax.lax.scan(micro_grads, zeros, (micro, jnp.arange(accum)))
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "tokens": n_tokens,
                   "lr": learning_rate_schedule(self.optim_cfg, self.total_steps)(state["step"])}
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    def _eval_step(self, params: Any, batch: Batch) -> dict[str, jax.Array]:
        with activation_layout(self.mesh, self.rules):
            batch = self.prepare(batch, jax.random.key(self.seed + 1))  # the same masking at every evaluation
            loss_sum, count, correct = forward_loss_sum(self.graphdef, params, batch, None)
        return {"loss_sum": loss_sum, "tokens": count, "correct": correct}

    def put_batch(self, batch: dict[str, Any]) -> Batch:
        """This process's rows of the global batch, assembled into one globally sharded array each."""
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in batch.items()}
