"""The one pure training step and the one evaluation loop, and the sharded train state they run on.

State is a plain dict ``{"params", "opt_state", "step"}`` of arrays (what Orbax saves). ``train_step``
runs any objective (train/objectives.py: LM, MLM, seq2seq, SFT, classification, DPO), with LoRA and
frozen parameters (base model, DPO reference) as an argument, never in the optimizer. ``Trainer``
compiles it once per run with ``jax.jit`` using in/out shardings derived from the logical-axis rules,
with the state donated so parameters and optimizer moments are updated in place. ``run_eval`` is the
evaluation loop of every objective.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from qkv.model import ModelConfig, abstract_model, create_model, logical_axes, param_metadata, split_params

from .config import LoraConfig, OptimConfig
from .lora import init_lora, merge_lora
from .objectives import Objective, cross_entropy, loss_tokens
from .sharding import activation_layout, batch_sharding, replicated, tree_shardings
from qkv.errors import UserError

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


# Axes that mark an embedding table or an output head (token and position embeddings, the untied LM head, a
# classifier): Muon's authors keep these on AdamW with the norms and biases, and orthogonalise hidden matrices only.
TABLE_AXES = frozenset({"vocab", "position", "classes"})
STACK_AXES = frozenset({"layers", "expert"})  # separate matrices stacked along one array axis


def muon_dimensions(axes: Any) -> Any:
    """Per parameter, how Muon sees it as a matrix (from its logical axes), or None for AdamW.

    A hidden projection's input side is ``embed`` when that is its first axis (wq, wk, wv, mlp.wi, mlp.wg: the
    rest is the output), otherwise its last axis is the output ``embed`` (attention and MLP ``wo``);
    ``layers`` (and ``experts``) stack separate matrices. By role, embedding tables and output heads (an axis in
    ``TABLE_AXES``: ``embed``, ``pos_embed``, ``lm_head``, ``cls_head``), norms and biases stay on AdamW."""
    from optax.contrib import MuonDimensionNumbers

    def dims(names: tuple[str, ...]) -> Any:
        own = [i for i, n in enumerate(names) if n not in STACK_AXES]
        if TABLE_AXES.intersection(names) or len(own) < 2 or "embed" not in names:
            return None
        if names[own[0]] == "embed":
            return MuonDimensionNumbers(reduction_axis=(own[0],), output_axis=tuple(own[1:]))
        return MuonDimensionNumbers(reduction_axis=tuple(own[:-1]), output_axis=(own[-1],))
    return jax.tree.map(dims, axes, is_leaf=lambda x: isinstance(x, tuple))


def scale_by_width(weight_dimension_numbers: Callable[[Any], Any]) -> optax.GradientTransformation:
    """Muon's width scaling (github.com/KellerJordan/Muon): each orthogonalised update times
    sqrt(max(1, fan_out / fan_in)), fan-in and fan-out read from the matrix's ``MuonDimensionNumbers``. optax >= 0.2.7
    moved this out of ``scale_by_muon`` into a transform it does not export; this is that transform."""
    from optax.contrib import MuonDimensionNumbers

    def scale(update: jax.Array, d: Any) -> jax.Array:
        if not isinstance(d, MuonDimensionNumbers):  # an AdamW leaf, masked out inside the partition
            return update
        fan_in = np.prod([update.shape[a] for a in d.reduction_axis])
        fan_out = np.prod([update.shape[a] for a in d.output_axis])
        return update * np.sqrt(max(1.0, fan_out / fan_in)).astype(update.dtype)

    def update_fn(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        dims = weight_dimension_numbers(updates)
        return jax.tree.map(scale, updates, dims, is_leaf=lambda x: x is None or isinstance(x, MuonDimensionNumbers)
                            ), state
    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def make_optimizer(cfg: OptimConfig, total_steps: int, decay_mask: Any, axes: Any = None) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (or Muon for the hidden weight matrices named by ``axes``); ``decay_mask``
    (True per weight matrix) spares norms and biases."""
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    schedule = learning_rate_schedule(cfg, total_steps)
    adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)
    if cfg.name == "muon" and axes is None:  # the config refuses Muon with LoRA; this guards the Python API
        raise UserError("optim.name=muon needs the model's weight matrices (LoRA adapters are not trained with "
                        "Muon): use optim.name=adamw")
    if cfg.name == "muon":
        from optax.contrib import MuonDimensionNumbers, scale_by_muon
        dims = muon_dimensions(axes)
        is_dims = lambda x: x is None or isinstance(x, MuonDimensionNumbers)  # noqa: E731
        labels = jax.tree.map(lambda d: "adamw" if d is None else "muon", dims, is_leaf=is_dims)
        # inside the partition the AdamW leaves arrive as empty (masked) nodes: keep them as they come
        masked_dims = lambda tree: jax.tree.map(lambda d, x: x if d is None else d, dims, tree,  # noqa: E731
                                                is_leaf=is_dims)
        matrices = optax.chain(scale_by_muon(weight_dimension_numbers=masked_dims),
                               scale_by_width(masked_dims),
                               optax.add_decayed_weights(cfg.weight_decay),
                               optax.scale_by_learning_rate(learning_rate_schedule(
                                   replace(cfg, learning_rate=cfg.muon_learning_rate), total_steps)))
        parts.append(optax.partition({"muon": matrices, "adamw": adamw}, labels))
    else:
        parts.append(adamw)
    return optax.chain(*parts)


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
    # A state leaf belongs to the parameter whose path ends its own path (…mu['blocks']['attn']['wq']) and whose
    # shape it has; this also sees through optax.partition's masked sub-states (Muon), which tree_map_params cannot.
    owners = {tuple(path): (a.shape, a.sharding) for path, a in jax.tree_util.tree_flatten_with_path(params)[0]}

    def sharding_of(path: tuple, leaf: jax.ShapeDtypeStruct) -> Any:
        for start in range(len(path)):
            shape, sharding = owners.get(tuple(path[start:]), (None, None))
            if shape == leaf.shape:
                return sharding
        return replicated(mesh)
    opt_shardings = jax.tree_util.tree_map_with_path(sharding_of, abstract_opt)
    shardings = {"params": param_shardings, "opt_state": opt_shardings, "step": replicated(mesh)}
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            {"params": params, "opt_state": abstract_opt, "step": jax.ShapeDtypeStruct((), jnp.int32)},
                            shardings)
    return shardings, abstract


CPU_UNROLL_MAX_LAYERS = 8


def platform_model_config(model_cfg: ModelConfig, mesh: Mesh) -> ModelConfig:
    """``model_cfg`` with the settings it leaves to the platform decided (the math is the same either way).

    ``scan_layers=None``: unrolled on CPU up to ``CPU_UNROLL_MAX_LAYERS`` layers — XLA:CPU spends more on a
    scan's bookkeeping (zero-filled, copied per-layer residual and gradient stacks, dynamic slices) than
    the small matmuls of such models take (docs/benchmarks.md) — and scanned elsewhere (fast compiles).
    """
    if model_cfg.scan_layers is not None:
        return model_cfg
    cpu = all(d.platform == "cpu" for d in mesh.devices.flat)
    depth = max(model_cfg.n_layers, model_cfg.encoder_layers)
    return model_cfg.replace(scan_layers=not (cpu and depth <= CPU_UNROLL_MAX_LAYERS))


def train_step(state: State, frozen: Any, batch: Batch, *, objective: Objective, graphdef: nnx.GraphDef,
               tx: optax.GradientTransformation, schedule: optax.Schedule, grad_accum: int, seed: int,
               merge: Callable[[Any, Any], Any] | None = None, skip_nonfinite: bool = False
               ) -> tuple[State, dict[str, jax.Array]]:
    """One optimizer step of ``objective`` on ``batch``: the only training step there is.

    ``state["params"]`` are what the optimizer sees (the whole model, or LoRA adapters); ``frozen`` is
    what it never sees (the base model under LoRA, the DPO reference; None otherwise), and
    ``merge(trainable, frozen)`` gives the model the objective runs. The batch is prepared on the device
    (MLM masking), split into ``grad_accum`` micro-batches whose gradients add up (each normalised by
    the whole batch), and the update applied. With ``skip_nonfinite`` an update whose loss or gradient
    norm is NaN/Inf is not applied (parameters and optimizer state stay; the step still advances) and
    ``metrics["skipped"]`` is 1.
    """
    step_key = jax.random.fold_in(jax.random.key(seed), state["step"])
    if objective.prepare is not None:
        batch = objective.prepare(batch, jax.random.fold_in(step_key, PREPARE_KEY))
    n_tokens = loss_tokens(batch)
    denom = objective.normalizer(batch)
    micro = jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)
    model_params = merge or (lambda trainable, _: trainable)

    def loss_and_grads(micro_batch, i):
        def loss_fn(trainable):
            loss_sum, sums = objective.loss(graphdef, model_params(trainable, frozen), frozen, micro_batch,
                                            jax.random.fold_in(step_key, i))
            return loss_sum / denom, {k: v / denom for k, v in sums.items()}  # micro-grads simply add up
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        return loss, aux, grads

    def micro_grads(carry, xs):
        return jax.tree.map(jnp.add, carry, loss_and_grads(*xs)), None

    if grad_accum == 1:  # no loop: a one-trip scan still zero-fills and copies every gradient buffer (CPU profile)
        loss, aux, grads = loss_and_grads(batch, jnp.int32(0))
    else:
        first = jax.tree.map(lambda x: x[0], micro)  # the metrics' names and shapes (the model's MoE statistics too)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(loss_and_grads, first, jnp.int32(0)))
        (loss, aux, grads), _ = jax.lax.scan(micro_grads, zeros, (micro, jnp.arange(grad_accum)))
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "tokens": n_tokens, "lr": schedule(state["step"]),
               **aux}
    if skip_nonfinite:
        ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
        keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
        params = jax.tree.map(keep, params, state["params"])
        opt_state = jax.tree.map(keep, opt_state, state["opt_state"])
        metrics["skipped"] = jnp.logical_not(ok).astype(jnp.int32)
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics


def eval_step(params: Any, frozen: Any, batch: Batch, index: jax.Array, *, objective: Objective,
              graphdef: nnx.GraphDef, seed: int, merge: Callable[[Any, Any], Any] | None = None
              ) -> dict[str, jax.Array]:
    """The objective's evaluation sums for one batch; batch ``index`` seeds its preparation (MLM masks
    differ from batch to batch, and are the same at every evaluation)."""
    if objective.prepare is not None:
        batch = objective.prepare(batch, jax.random.fold_in(jax.random.key(seed + 1), index))
    model = merge(params, frozen) if merge is not None else params
    return objective.evaluate(graphdef, model, frozen, batch)


@dataclass
class Trainer:
    """Everything needed to build, shard and step one model; created once per run.

    ``objective`` (train/objectives.py; default: token cross-entropy with the optimizer's z-loss and
    label smoothing) is what the one ``train_step`` optimizes. With ``lora`` (rank > 0) the state holds
    only the adapters and the base model is frozen; with ``reference`` a frozen copy of the initial
    model is passed too (DPO). The frozen tree is ``self.frozen``, set by the caller, passed to the
    compiled steps as an argument: never in the optimizer, never saved.
    """

    model_cfg: ModelConfig
    optim_cfg: OptimConfig
    mesh: Mesh
    rules: dict[str, Any]
    total_steps: int
    seed: int = 0
    objective: Objective | None = None
    lora: LoraConfig | None = None
    reference: bool = False
    skip_nonfinite: bool = False

    def __post_init__(self) -> None:
        o = self.optim_cfg
        self.model_cfg = platform_model_config(self.model_cfg, self.mesh)
        self.objective = self.objective or cross_entropy("tokens", o.z_loss, o.label_smoothing)
        self.graphdef, self.base_abstract, decay_mask = abstract_params(self.model_cfg, self.mesh, self.rules)
        self.base_shardings = jax.tree.map(lambda a: a.sharding, self.base_abstract)
        self.lora = self.lora if self.lora is not None and self.lora.rank > 0 else None
        trainable, merge = self.base_abstract, None
        # each parameter's logical axes: LoRA's adapter shapes and Muon's matrices are read from them
        needs_axes = self.lora is not None or o.name == "muon"
        self._axes = logical_axes(abstract_model(self.model_cfg)) if needs_axes else None
        if self.lora is not None:
            shapes = jax.eval_shape(self._init_adapters, 0)
            trainable = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated(self.mesh)),
                                     shapes)
            decay_mask = jax.tree.map(lambda _: True, shapes)
            scale = self.lora.alpha / self.lora.rank
            merge = lambda adapters, base: merge_lora(base, adapters, scale)  # noqa: E731
        self.merge = merge
        self.tx = make_optimizer(o, self.total_steps, decay_mask, self._axes if self.lora is None else None)
        self.state_shardings, self.abstract_state = abstract_train_state(self.tx, trainable, self.mesh)
        self.param_shardings = self.state_shardings["params"]
        self.frozen_shardings = self.base_shardings if (self.lora is not None or self.reference) else None
        self.frozen: Any = None
        self.batch_sharding = batch_sharding(self.mesh, self.rules)
        step = functools.partial(train_step, objective=self.objective, graphdef=self.graphdef, tx=self.tx,
                                 schedule=learning_rate_schedule(o, self.total_steps), grad_accum=o.grad_accum,
                                 seed=self.seed, merge=merge, skip_nonfinite=self.skip_nonfinite)
        evaluate = functools.partial(eval_step, objective=self.objective, graphdef=self.graphdef, seed=self.seed,
                                     merge=merge)
        self._train_step = jax.jit(self._laid_out(step, "train_step"), donate_argnums=0,
                                   in_shardings=(self.state_shardings, self.frozen_shardings, self.batch_sharding),
                                   out_shardings=(self.state_shardings, replicated(self.mesh)))
        self._eval_step = jax.jit(self._laid_out(evaluate, "eval_step"), out_shardings=replicated(self.mesh),
                                  in_shardings=(self.param_shardings, self.frozen_shardings, self.batch_sharding,
                                                replicated(self.mesh)))

    def _laid_out(self, fn: Callable, name: str) -> Callable:
        def run(*args):
            with activation_layout(self.mesh, self.rules):  # the model's layout hints apply while tracing
                return fn(*args)
        run.__name__ = run.__qualname__ = name  # the compiled module's name (jit_<name>): profiles and dumps find it
        return run

    def _init_adapters(self, seed: int) -> Any:
        return init_lora(self.base_abstract, self._axes, self.lora.targets, self.lora.rank, seed)

    @property
    def train_step(self) -> "WithFrozen":
        """The compiled step as ``train_step(state, batch)`` (and ``.lower(state, batch)``), frozen tree bound."""
        return WithFrozen(self._train_step, self.frozen)

    def eval_step(self, params: Any, batch: Batch, index: int = 0) -> dict[str, jax.Array]:
        i = jax.make_array_from_process_local_data(replicated(self.mesh), np.int32(index))
        return self._eval_step(params, self.frozen, batch, i)

    def init_state(self, params: Any = None) -> State:
        """Fresh optimizer state for ``params`` (the model to fine-tune; LoRA: its adapters are made
        fresh) or, with none, fresh parameters too, created directly in their shards."""
        if params is None:
            def init() -> State:
                _, fresh = split_params(create_model(self.model_cfg, self.seed))
                return {"params": fresh, "opt_state": self.tx.init(fresh), "step": jnp.int32(0)}
            return jax.jit(init, out_shardings=self.state_shardings)()
        if self.lora is not None:
            params = jax.jit(lambda: self._init_adapters(self.seed), out_shardings=self.param_shardings)()
        opt = jax.jit(self.tx.init, out_shardings=self.state_shardings["opt_state"])(params)
        return {"params": params, "opt_state": opt, "step": jax.device_put(jnp.int32(0), self.state_shardings["step"])}

    def model_params(self, trainable: Any) -> Any:
        """The parameters the model runs with: ``trainable``, merged with the frozen base under LoRA."""
        return self.merge(trainable, self.frozen) if self.merge is not None else trainable

    def put_batch(self, batch: dict[str, Any]) -> Batch:
        """This process's rows of the global batch, assembled into one globally sharded array each."""
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in batch.items()}


@dataclass(frozen=True)
class WithFrozen:
    """A compiled ``fn(state, frozen, batch)`` called, or lowered, as ``(state, batch)``."""

    fn: Any
    frozen: Any

    def __call__(self, state: State, batch: Batch):
        return self.fn(state, self.frozen, batch)

    def lower(self, state: Any, batch: Any) -> "WithFrozen":
        """The lowered step; its ``compile()`` is again called as ``(state, batch)``."""
        return WithFrozen(self.fn.lower(state, self.frozen, batch), self.frozen)

    def compile(self) -> "WithFrozen":
        return WithFrozen(self.fn.compile(), self.frozen)

    def __getattr__(self, name: str) -> Any:  # memory_analysis, cost_analysis, as_text... of what it wraps
        if name in ("fn", "frozen"):
            raise AttributeError(name)
        return getattr(self.fn, name)


def agree_across_processes(value: int) -> tuple[int, int]:
    """(max, min) of ``value`` over all processes (the value itself with one process)."""
    if jax.process_count() == 1:
        return value, value
    from jax.experimental import multihost_utils
    values = np.asarray(multihost_utils.process_allgather(np.int32(value)))
    return int(values.max()), int(values.min())


def same_count(batches: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """This process's evaluation batches padded with empty ones (loss_mask 0) to the largest count of
    any process, so every process runs the same number of compiled (collective) evaluation steps."""
    most, fewest = agree_across_processes(len(batches))
    if most == len(batches):
        return batches
    if fewest == 0 and most > 0:  # every process reaches this same decision
        raise UserError(f"a process has no evaluation examples while another has {most} batches: use a larger "
                        "validation split (data.validation_fraction, finetune.eval_path) or fewer processes")
    return batches + [{k: np.zeros_like(v) for k, v in batches[0].items()}] * (most - len(batches))


def run_eval(trainer: Trainer, params: Any, batches: Iterable[dict[str, np.ndarray]]) -> dict[str, float]:
    """The one evaluation loop, for every objective: the objective's sums over ``batches`` (padded to
    the same count on every process), summarised once (loss, perplexity, accuracy; DPO rewards...)."""
    totals: dict[str, float] = {}
    for i, batch in enumerate(same_count(list(batches))):
        out = jax.device_get(trainer.eval_step(params, trainer.put_batch(batch), i))
        for k, v in out.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    return trainer.objective.summarize(totals)
