"""``qkv finetune``: supervised fine-tuning (SFT) and DPO from an existing checkpoint, fully or with LoRA.

A fine-tuning run starts from the parameters of ``finetune.init_from`` (a run written by ``qkv
pretrain``, ``qkv convert import``, ``merge-lora`` or another full fine-tune) and writes a new run
directory laid out like a pretraining run (``config.yaml``, ``metrics.jsonl``, ``tensorboard/``,
``checkpoints/``). The model config and tokenizer come from the init checkpoint; model keys set in
the fine-tuning config override it (shape changes are refused by the shape check, naming the
parameter). The training loop is ``train.loop._train`` itself (progress, metrics, evaluation,
checkpoints, NaN checks, SIGTERM handling); this module supplies the trainer, data and evaluation.

The train state is the same dict ``{"params", "opt_state", "step"}``, where ``params`` holds what is
trained: the whole model (full fine-tuning), or only the LoRA adapters (``finetune.lora.rank > 0``).
Frozen arrays — the base model under LoRA, the reference model of DPO — are passed to the compiled
step as a separate argument: never in the optimizer, never saved (the run's config names
``init_from`` and the fixed ``init_step`` instead, and they are reloaded from there).

LoRA: for each targeted kernel W of shape [layers, *in, *out] (out = the trailing ``embed`` axis
for output projections, otherwise everything after the first input axis) the adapters are
A [layers, in, r] (normal, std 1/sqrt(in)) and B [layers, r, out] (zeros), and the forward pass uses
W + (alpha / r) · A @ B, merged functionally before the model runs. LoRA dropout is not implemented
(``model.dropout`` still applies inside the model).

DPO: rows come in (chosen, rejected) pairs sharing a prompt; π and π_ref are the summed response
log-probabilities under the policy and the frozen reference (the init parameters), and the loss is
−log σ(β[(π_c − π_ref,c) − (π_r − π_ref,r)]), averaged over pairs. Metrics add the implicit rewards
β(π − π_ref) of chosen and rejected responses, their margin and the fraction of pairs with a
positive margin (reward accuracy).
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import json
import math
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import yaml
from flax import nnx

from qkv.data import (ClassifyIterator, Tokenizer, classify_eval_batches, classify_examples, infer_labels, read_labeled,
                      tfds_labeled)
from qkv.data.sft import DPOIterator, PackedSFTIterator, eval_batches, load_dpo, load_sft
from qkv.inference.decode import Decoder, SamplingConfig

from . import checkpoint, loop
from .config import Config, MeshConfig, TrainConfig, _set_dotted, config_from_dict, parse_override, read_yaml
from .distributed import maybe_initialize, process_data_state
from .sharding import activation_layout, batch_sharding, check_batch, make_mesh, replicated, resolve_rules
from .step import abstract_params, abstract_train_state, learning_rate_schedule, make_optimizer, token_losses
from .lora import init_lora, lora_paths, merge_lora
from .tasks import pad_to_same_count
from .validate import check_run_dir

# ---------------------------------------------------------------------------------------------
# The trainer: same interface as train.step.Trainer, as far as train.loop uses it


def sequence_logps(graphdef: nnx.GraphDef, params: Any, batch: dict[str, jax.Array],
                   dropout_key: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(summed log-probability of each row's loss-masked targets [B], their count [B], how many of them
    argmax predicts [B]); targets are response tokens (SFT, DPO) or the row's class (classify)."""
    logits = nnx.merge(graphdef, params).forward_batch(batch, dropout_key)
    mask = batch["loss_mask"].astype(jnp.float32)
    correct = jnp.sum((jnp.argmax(logits, axis=-1) == batch["targets"]) * mask, axis=-1)
    return -jnp.sum(token_losses(logits, batch["targets"]) * mask, axis=-1), jnp.sum(mask, axis=-1), correct


def dpo_terms(policy_logps: jax.Array, reference_logps: jax.Array, beta: float) -> dict[str, jax.Array]:
    """Per-pair DPO quantities from per-row summed log-probs with rows (chosen, rejected) interleaved."""
    reward_c = beta * (policy_logps[0::2] - reference_logps[0::2])
    reward_r = beta * (policy_logps[1::2] - reference_logps[1::2])
    margin = reward_c - reward_r
    return {"loss": -jax.nn.log_sigmoid(margin), "reward_chosen": reward_c, "reward_rejected": reward_r,
            "reward_margin": margin, "reward_accuracy": (margin > 0).astype(jnp.float32)}


DPO_METRICS = ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy")


class FinetuneTrainer:
    """Builds, shards and steps a fine-tuning run; ``train_step(state, batch)`` like ``Trainer``."""

    def __init__(self, cfg: Config):
        ft = cfg.finetune
        self.cfg, self.model_cfg, self.optim_cfg = cfg, cfg.model, cfg.optim
        self.dpo, self.lora = ft.method == "dpo", ft.lora.rank > 0
        if (ft.method == "classify") != bool(cfg.model.n_classes) or (ft.method == "classify" and self.lora):
            raise ValueError("finetune.method=classify trains an encoder (model.kind=encoder) with model.n_classes set, "
                             "fully (finetune.lora.rank=0); other methods need a model without a class head")
        self.lora_scale = ft.lora.alpha / ft.lora.rank if self.lora else 0.0
        self.mesh = make_mesh(cfg.mesh)
        self.rules = resolve_rules(cfg.mesh.rules)
        check_batch(cfg.train.batch_size, self.mesh, self.rules)
        accum = cfg.optim.grad_accum
        if self.dpo and (cfg.train.batch_size // jax.process_count()) % (2 * accum):
            raise ValueError(f"train.batch_size={cfg.train.batch_size} rows must hold whole (chosen, rejected) pairs "
                             f"in every micro-batch and process: make it a multiple of 2 x optim.grad_accum x processes")
        self.graphdef, self.base_abstract, decay_mask = abstract_params(cfg.model, self.mesh, self.rules)
        self.base_shardings = jax.tree.map(lambda a: a.sharding, self.base_abstract)
        if self.lora:
            from qkv.model import abstract_model, logical_axes
            axes = logical_axes(abstract_model(cfg.model))
            shapes = jax.eval_shape(lambda: init_lora(self.base_abstract, axes, ft.lora.targets, ft.lora.rank, 0))
            self._lora_axes = axes
            trainable = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated(self.mesh)),
                                     shapes)
            decay_mask = jax.tree.map(lambda _: True, shapes)
        else:
            trainable = self.base_abstract
        self.tx = make_optimizer(cfg.optim, cfg.train.steps, decay_mask)
        self.state_shardings, self.abstract_state = abstract_train_state(self.tx, trainable, self.mesh)
        self.param_shardings = self.state_shardings["params"]
        self.frozen_shardings = self.base_shardings if (self.lora or self.dpo) else None
        self.frozen: Any = None  # base model (LoRA) and/or DPO reference; set by the caller
        self.batch_sharding = batch_sharding(self.mesh, self.rules)
        self._jit_step = jax.jit(self._step, in_shardings=(self.state_shardings, self.frozen_shardings,
                                                           self.batch_sharding),
                                 out_shardings=(self.state_shardings, replicated(self.mesh)), donate_argnums=0)
        self._jit_eval = jax.jit(self._eval, in_shardings=(self.param_shardings, self.frozen_shardings,
                                                           self.batch_sharding), out_shardings=replicated(self.mesh))

    # -- what train.loop calls
    def train_step(self, state: dict[str, Any], batch: dict[str, jax.Array]):
        return self._jit_step(state, self.frozen, batch)

    def _train_step(self, state: dict[str, Any], batch: dict[str, jax.Array]):  # traced by loop._skipping_step
        return self._step(state, self.frozen, batch)

    def eval_step(self, params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        return self._jit_eval(params, self.frozen, batch)

    def put_batch(self, batch: dict[str, Any]) -> dict[str, jax.Array]:
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in batch.items()}

    # -- the model the trainable parameters describe
    def policy_params(self, trainable: Any, frozen: Any) -> Any:
        return merge_lora(frozen, trainable, self.lora_scale) if self.lora else trainable

    def init_trainable(self, base_params: Any) -> Any:
        if not self.lora:
            return base_params
        ft = self.cfg.finetune
        init = lambda: init_lora(self.base_abstract, self._lora_axes, ft.lora.targets, ft.lora.rank,  # noqa: E731
                                 self.cfg.train.seed)
        return jax.jit(init, out_shardings=self.param_shardings)()

    def init_state(self, trainable: Any) -> dict[str, Any]:
        opt = jax.jit(self.tx.init, out_shardings=self.state_shardings["opt_state"])(trainable)
        return {"params": trainable, "opt_state": opt,
                "step": jax.device_put(jnp.int32(0), self.state_shardings["step"])}

    def _objective(self, trainable, frozen, batch, key, denom):
        """(loss normalised by the whole batch's ``denom``, metric sums normalised the same way)."""
        params = self.policy_params(trainable, frozen)
        if not self.dpo:
            logps = sequence_logps(self.graphdef, params, batch, key)[0]
            return -jnp.sum(logps) / denom, {}
        policy = sequence_logps(self.graphdef, params, batch, key)[0]
        reference = jax.lax.stop_gradient(sequence_logps(self.graphdef, frozen, batch, None)[0])
        terms = dpo_terms(policy, reference, self.cfg.finetune.dpo_beta)
        valid = (jnp.sum(batch["loss_mask"][0::2], axis=-1) > 0).astype(jnp.float32)
        sums = {k: jnp.sum(v * valid) / denom for k, v in terms.items()}
        return sums.pop("loss"), sums

    def _step(self, state, frozen, batch):
        with activation_layout(self.mesh, self.rules):
            accum = self.optim_cfg.grad_accum
            n_tokens = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
            denom = jnp.float32(batch["inputs"].shape[0] // 2) if self.dpo else n_tokens
            step_key = jax.random.fold_in(jax.random.key(self.cfg.train.seed), state["step"])
            micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

            def micro_grads(carry, xs):
                micro_batch, i = xs
                loss_fn = lambda t: self._objective(t, frozen, micro_batch, jax.random.fold_in(step_key, i), denom)  # noqa: E731
                (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
                return jax.tree.map(jnp.add, carry, (loss, aux, grads)), None

            aux0 = {k: jnp.float32(0.0) for k in DPO_METRICS} if self.dpo else {}
            zeros = (jnp.float32(0.0), aux0, jax.tree.map(jnp.zeros_like, state["params"]))
            (loss, aux, grads), _ = jax.lax.scan(micro_grads, zeros, (micro, jnp.arange(accum)))
            updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
            params = optax.apply_updates(state["params"], updates)
            metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "tokens": n_tokens,
                       "lr": learning_rate_schedule(self.optim_cfg, self.cfg.train.steps)(state["step"]), **aux}
            return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    def _eval(self, trainable, frozen, batch):
        with activation_layout(self.mesh, self.rules):
            params = self.policy_params(trainable, frozen)
            logps, counts, correct = sequence_logps(self.graphdef, params, batch, None)
            if not self.dpo:
                return {"loss_sum": -jnp.sum(logps), "tokens": jnp.sum(counts), "correct": jnp.sum(correct)}
            reference = sequence_logps(self.graphdef, frozen, batch, None)[0]
            terms = dpo_terms(logps, reference, self.cfg.finetune.dpo_beta)
            valid = (counts[0::2] > 0).astype(jnp.float32)
            out = {k: jnp.sum(v * valid) for k, v in terms.items()}
            return {**out, "pairs": jnp.sum(valid), "chosen_nll": -jnp.sum(logps[0::2] * valid),
                    "chosen_tokens": jnp.sum(counts[0::2] * valid)}


def run_finetune_eval(trainer: FinetuneTrainer, params: Any, batches: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """SFT: response-token loss and perplexity. DPO: DPO loss, rewards, accuracy and the perplexity of
    the chosen responses. Sums over every batch, then divided once."""
    totals: dict[str, float] = {}
    for batch in batches:
        out = jax.device_get(trainer.eval_step(params, trainer.put_batch(batch)))
        for k, v in out.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    if not trainer.dpo:  # SFT: response tokens; classify: one label per example ("tokens" counts examples)
        loss = totals["loss_sum"] / max(totals["tokens"], 1.0)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
                "accuracy": totals["correct"] / max(totals["tokens"], 1.0), "tokens": totals["tokens"]}
    pairs = max(totals["pairs"], 1.0)
    nll = totals["chosen_nll"] / max(totals["chosen_tokens"], 1.0)
    return {"loss": totals["loss"] / pairs, **{k: totals[k] / pairs for k in DPO_METRICS},
            "perplexity": math.exp(min(nll, 50.0)), "pairs": totals["pairs"]}


# ---------------------------------------------------------------------------------------------
# Configuration and checkpoints


def _resolved_init(init_from: str, init_step: int | None) -> tuple[str, int, dict[str, Any]]:
    path = Path(init_from).expanduser().resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"finetune.init_from={init_from!r} does not exist: pass a run directory "
                                "(qkv pretrain, qkv convert import or merge-lora)")
    meta = checkpoint.read_meta(path, init_step)
    saved = meta["config"].get("finetune", {})
    if saved.get("lora", {}).get("rank", 0):
        raise ValueError(f"finetune.init_from={init_from!r} is a LoRA run: merge it first with "
                         "qkv convert merge-lora RUN_DIR OUT_DIR and start from OUT_DIR")
    if "tokenizer" not in meta:
        raise ValueError(f"finetune.init_from={init_from!r} has no tokenizer: convert it again with --tokenizer")
    return str(path), int(meta["step"]), meta


def finetune_preset_names() -> list[str]:
    folder = importlib.resources.files("qkv.configs").joinpath("finetune")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml")) if folder.is_dir() else []


def _read_finetune_yaml(source: str | Path) -> dict[str, Any]:
    """A fine-tuning preset (configs/finetune/NAME.yaml: sft-tiny, lora-tiny, dpo-tiny) or any YAML path."""
    if str(source) in finetune_preset_names():
        return yaml.safe_load(importlib.resources.files("qkv.configs").joinpath(
            "finetune", f"{source}.yaml").read_text()) or {}
    return read_yaml(source)


def load_finetune_config(source: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The fine-tuning config: YAML + overrides, with the model section taken from ``finetune.init_from``
    (keys set explicitly override it), ``init_from`` made absolute and ``init_step`` fixed."""
    data = _read_finetune_yaml(source or "sft-tiny")
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(data, key, value)
    ft = data.get("finetune") or {}
    if not isinstance(ft, dict) or not ft.get("init_from"):
        raise ValueError("finetune.init_from=RUN_DIR is required: the checkpoint to fine-tune")
    from_tfds = ft.get("method") == "classify" and (data.get("data") or {}).get("source") == "tfds"
    if not ft.get("train_path") and not from_tfds:
        raise ValueError("finetune.train_path=FILE.jsonl is required: the training examples")
    init_step = ft.get("init_step")
    run_dir = (data.get("train") or {}).get("run_dir") or TrainConfig.run_dir
    if init_step is None and checkpoint.latest_step(Path(run_dir).expanduser()) is not None:
        # Resuming: keep the base step fixed at the first start, even if init_from trained on since.
        saved = checkpoint.read_meta(Path(run_dir).expanduser())["config"].get("finetune") or {}
        if saved.get("init_from") == str(Path(str(ft["init_from"])).expanduser().resolve()):
            init_step = saved.get("init_step")
    init_dir, init_step, meta = _resolved_init(str(ft["init_from"]), init_step)
    ft.update(init_from=init_dir, init_step=init_step)
    data["finetune"] = ft
    data["model"] = {**meta["config"]["model"], **(data.get("model") or {})}
    if ft.get("method") == "classify":
        _classify_settings(data, ft, str(ft["init_from"]))
    data_section = data.setdefault("data", {})
    data_section.setdefault("seq_len", min(256, data["model"]["max_seq_len"]))
    return config_from_dict(data)


def load_base_params(cfg: Config, shardings_from: Any) -> tuple[Any, dict[str, Any]]:
    """(the init checkpoint's parameters on ``shardings_from``'s shardings, its meta); shapes checked.

    A classifier started from an encoder without a class head gets a fresh one (the rest is loaded)."""
    ft = cfg.finetune
    init_classes = checkpoint.read_meta(ft.init_from, ft.init_step)["config"]["model"].get("n_classes", 0)
    new_head = {k: v for k, v in shardings_from.items() if k in CLASS_HEAD} if not init_classes else {}
    body = {k: v for k, v in shardings_from.items() if k not in new_head}
    state, meta = checkpoint.restore(ft.init_from, {"params": body}, ft.init_step, with_optimizer=False)
    params = state["params"]
    if new_head:
        key = jax.random.key(cfg.train.seed)
        std = cfg.model.init_std
        params["cls_head"] = jax.jit(lambda: std * jax.random.normal(key, new_head["cls_head"].shape),
                                     out_shardings=new_head["cls_head"].sharding)().astype(new_head["cls_head"].dtype)
        params["cls_bias"] = jax.jit(lambda: jnp.zeros(new_head["cls_bias"].shape, new_head["cls_bias"].dtype),
                                     out_shardings=new_head["cls_bias"].sharding)()
    return params, meta


CLASS_HEAD = ("cls_head", "cls_bias")


def _classify_settings(data: dict[str, Any], ft: dict[str, Any], init_from: str) -> None:
    """Classification: the init run must be an encoder; the label set is fixed at the first start (from
    the training data unless given) and sizes the head (model.n_classes)."""
    if data["model"].get("kind") != "encoder":
        raise ValueError(f"finetune.method=classify needs an encoder checkpoint (model.kind=encoder): "
                         f"{init_from} holds a model.kind={data['model'].get('kind', 'decoder')} model")
    if not ft.get("labels"):
        d = data.get("data") or {}
        if d.get("source") == "tfds":
            records, names = _tfds_records(data, ft, "train")
            ft["labels"] = names or infer_labels(records)
        else:
            text_field = d.get("text_field", "text")
            ft["labels"] = infer_labels(read_labeled(str(ft["train_path"]), text_field=text_field,
                                                     label_field=ft.get("label_field", "label")))
    data["model"]["n_classes"] = len(ft["labels"])


def _tfds_records(data: dict[str, Any], ft: dict[str, Any], split: str):
    d = data.get("data") or {}
    if not d.get("tfds_name"):
        raise ValueError("data.source=tfds needs data.tfds_name=NAME (e.g. glue/sst2)")
    return tfds_labeled(d["tfds_name"], split, Path(d.get("data_dir", "~/.cache/qkv/tfds")).expanduser(),
                        text_field=d.get("text_field", "sentence"), label_field=ft.get("label_field", "label"))


def load_lora_params(run_dir: str | Path, meta: dict[str, Any], abstract_base: Any) -> Any:
    """Base + adapters of a LoRA run's checkpoint (``meta`` from it), merged into plain parameters."""
    cfg = config_from_dict(meta["config"])
    base, _ = load_base_params(cfg, abstract_base)
    mesh = jax.tree.leaves(abstract_base)[0].sharding.mesh
    axes_shapes = _adapter_abstract(cfg, abstract_base, mesh)
    state, _ = checkpoint.restore(run_dir, {"params": axes_shapes}, meta["step"], with_optimizer=False)
    merged = jax.jit(merge_lora, static_argnums=2)(base, state["params"], cfg.finetune.lora.alpha / cfg.finetune.lora.rank)
    return merged


def _adapter_abstract(cfg: Config, abstract_base: Any, mesh) -> Any:
    from qkv.model import abstract_model, logical_axes
    axes = logical_axes(abstract_model(cfg.model))
    ft = cfg.finetune
    shapes = jax.eval_shape(lambda: init_lora(abstract_base, axes, ft.lora.targets, ft.lora.rank, 0))
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated(mesh)), shapes)


def write_params_checkpoint(run_dir: str | Path, params: Any, meta: dict[str, Any], step: int = 0) -> None:
    """A params-only checkpoint (like ``qkv convert import``): readable by generate, finetune, export."""
    sums, finite = checkpoint.checksums({"params": params})
    if not finite:
        raise ValueError("the parameters hold NaN or Inf: not writing them")
    mngr = checkpoint.manager(run_dir, keep=1)
    mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                            meta=ocp.args.JsonSave({**meta, "step": step, "checksums": sums})))
    mngr.wait_until_finished()
    mngr.close()


def merge_lora_run(run_dir: str | Path, out_dir: str | Path, step: int | None = None) -> dict[str, Any]:
    """``qkv convert merge-lora``: a LoRA run (base + adapters) -> a plain params checkpoint in out_dir."""
    run_dir, out_dir = Path(run_dir).expanduser().resolve(), Path(out_dir).expanduser().resolve()
    if checkpoint.latest_step(out_dir) is not None:
        raise ValueError(f"{out_dir} already holds a checkpoint: choose a new output directory")
    meta = checkpoint.read_meta(run_dir, step)
    cfg = config_from_dict(meta["config"])
    if cfg.finetune.lora.rank == 0:
        raise ValueError(f"{run_dir} is not a LoRA run (finetune.lora.rank=0): it is already a plain checkpoint")
    mesh = make_mesh(MeshConfig())
    _, abstract, _ = abstract_params(cfg.model, mesh, resolve_rules(cfg.mesh.rules))
    merged = load_lora_params(run_dir, meta, abstract)
    plain = dataclasses.replace(cfg, finetune=dataclasses.replace(
        cfg.finetune, lora=dataclasses.replace(cfg.finetune.lora, rank=0)))
    write_params_checkpoint(out_dir, merged, {"config": plain.to_dict(), "tokenizer": meta["tokenizer"],
                                              "source": {"merged_lora_run": str(run_dir), "step": meta["step"]}},
                            step=int(meta["step"]))
    return {"out_dir": str(out_dir), "step": int(meta["step"]), "base": cfg.finetune.init_from,
            "adapted": [".".join(p) for p in lora_paths(abstract, cfg.finetune.lora.targets)]}


# ---------------------------------------------------------------------------------------------
# The run


def _check_same_run(cfg: Config, meta: dict[str, Any], run_dir: Path) -> None:
    loop._check_resumable(cfg, meta, run_dir)
    saved = config_from_dict(meta["config"]).finetune
    for key in ("method", "init_from", "init_step", "train_path", "lora"):
        if getattr(saved, key) != getattr(cfg.finetune, key):
            raise ValueError(f"{run_dir} holds a run with finetune.{key}={getattr(saved, key)!r}, not "
                             f"{getattr(cfg.finetune, key)!r}: use another train.run_dir or keep the saved settings")


def _load_examples(cfg: Config, tok: Tokenizer, path: str | None, split: str = "train"):
    ft = cfg.finetune
    if ft.method == "classify":
        if path is None:  # data.source=tfds
            records, _ = _tfds_records(cfg.to_dict(), {"label_field": ft.label_field}, split)
        else:
            records = read_labeled(path, text_field=cfg.data.text_field, label_field=ft.label_field)
        return classify_examples(records, tok.encode, bos_id=tok.bos_id, eos_id=tok.eos_id, seq_len=cfg.data.seq_len,
                                 labels=ft.labels)
    load = load_dpo if ft.method == "dpo" else load_sft
    return load(path, tok.encode, bos_id=tok.bos_id, eos_id=tok.eos_id, seq_len=cfg.data.seq_len, overlong=ft.overlong)


def finetune(cfg: Config) -> dict[str, Any]:
    """Fine-tune (or resume) the run in ``cfg.train.run_dir``; returns a summary like ``pretrain``."""
    from_tfds = cfg.finetune.method == "classify" and cfg.data.source == "tfds"
    if not cfg.finetune.init_from or not (cfg.finetune.train_path or from_tfds):
        raise ValueError("finetune needs finetune.init_from and finetune.train_path (use load_finetune_config)")
    maybe_initialize(cfg.train.distributed)
    run_dir = Path(cfg.train.run_dir).expanduser().resolve()
    if run_dir == Path(cfg.finetune.init_from):
        raise ValueError("train.run_dir is finetune.init_from: write the fine-tuned run to a new directory")
    check_run_dir(run_dir)
    fresh_dir = not run_dir.exists()
    try:
        setup = _setup(cfg, run_dir)
    except BaseException:
        if fresh_dir and loop.is_main_process() and run_dir.exists():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    trainer, tok, state, data_iter, batches, good_step = setup
    try:
        summary = loop._train(cfg, run_dir, trainer, tok, state, data_iter, good_step,
                              evaluate=lambda params: run_finetune_eval(trainer, params, batches))
    except BaseException:
        trainer.frozen = None  # the cached trainer must not keep the base model alive
        raise
    summary["trainable_params"] = summary.pop("params")
    if cfg.train.sample_tokens > 0 and not summary.get("preempted") and cfg.train.sample_prompt \
            and cfg.model.kind == "decoder":
        restored = checkpoint.restore(run_dir, trainer.abstract_state, with_optimizer=False)[0]
        params = trainer.policy_params(restored["params"], trainer.frozen)
        decoder = Decoder(cfg.model, trainer.graphdef, SamplingConfig(temperature=0.0, max_new_tokens=cfg.train.sample_tokens,
                                                                         vocab_limit=tok.vocab_size))
        ids = decoder.generate(params, [[tok.bos_id] + tok.encode(cfg.train.sample_prompt)], tok.pad_id, tok.eos_id)[0]
        summary["sample"] = cfg.train.sample_prompt + tok.decode(ids)
        loop.log("sample (greedy):\n" + summary["sample"])
    trainer.frozen = None
    return summary


_CACHED: dict[str, FinetuneTrainer] = {}


def _trainer_for(cfg: Config) -> FinetuneTrainer:
    """The trainer of the previous run in this process when everything compiled into it is the same
    (a resumed or repeated run then skips recompiling its steps), else a new one."""
    d = cfg.to_dict()
    key = json.dumps({"model": d["model"], "optim": d["optim"], "mesh": d["mesh"], "devices": str(jax.devices()),
                      "train": [cfg.train.steps, cfg.train.seed, cfg.train.batch_size],
                      "finetune": [cfg.finetune.method, cfg.finetune.dpo_beta, d["finetune"]["lora"]]},
                     sort_keys=True, default=str)
    if key not in _CACHED:
        _CACHED.clear()
        _CACHED[key] = FinetuneTrainer(cfg)
    return _CACHED[key]


def _setup(cfg: Config, run_dir: Path):
    ft = cfg.finetune
    trainer = _trainer_for(cfg)
    restored = checkpoint.restore_newest_good(run_dir, trainer.abstract_state,
                                              check_meta=lambda meta: _check_same_run(cfg, meta, run_dir),
                                              report=loop.log)
    needs_base = restored is None or trainer.lora or trainer.dpo
    base, init_meta = load_base_params(cfg, trainer.base_abstract) if needs_base else (None, None)
    if restored is not None:
        state, meta = restored
        state["step"] = jax.device_put(np.int32(state["step"]), trainer.state_shardings["step"])
        tok = Tokenizer.from_bytes(checkpoint.decode_tokenizer(meta["tokenizer"]))
    else:
        meta = None
        tok = Tokenizer.from_bytes(checkpoint.decode_tokenizer(init_meta["tokenizer"]))
    if tok.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"the init checkpoint's tokenizer has {tok.vocab_size} pieces but model.vocab_size="
                         f"{cfg.model.vocab_size}")
    classify = ft.method == "classify"
    train_set = _load_examples(cfg, tok, ft.train_path)
    if ft.eval_path or (classify and not ft.train_path):  # an eval file, or the TFDS validation split
        eval_set = _load_examples(cfg, tok, ft.eval_path, "validation")
    else:
        eval_set = train_set
    for name, s in (("training", train_set), ("evaluation", eval_set)):
        if getattr(s, "skipped", 0):
            loop.log(f"skipped {s.skipped} {name} examples longer than data.seq_len={cfg.data.seq_len} "
                     "(finetune.overlong=skip)")
        if getattr(s, "truncated", 0):
            loop.log(f"truncated {s.truncated} of {len(s.items)} {name} texts to data.seq_len={cfg.data.seq_len}")
    per_process = cfg.train.batch_size // jax.process_count()
    items = train_set.items[jax.process_index()::jax.process_count()]
    if not items:
        raise ValueError(f"{ft.train_path} has fewer examples than there are processes ({jax.process_count()})")
    make = ClassifyIterator if classify else DPOIterator if trainer.dpo else PackedSFTIterator
    data_iter = make(items, seq_len=cfg.data.seq_len, batch_size=per_process, seed=cfg.train.seed)
    batches = _eval_batches(cfg, eval_set.items, trainer.dpo, cfg.data.eval_batches)
    if meta is not None:
        data_iter.set_state(json.loads(process_data_state(meta)))  # this process's own position
        loop.log(f"resumed {run_dir} at step {meta['step']}")
    else:
        if loop.is_main_process():
            run_dir.mkdir(parents=True, exist_ok=True)
        trainable = trainer.init_trainable(base)
        state = trainer.init_state(trainable)
        if trainer.dpo and not trainer.lora:
            base = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=trainer.base_shardings)(base)
    trainer.frozen = base if (trainer.lora or trainer.dpo) else None
    if loop.is_main_process():
        loop._write_atomic(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        loop._truncate_metrics(run_dir, meta["step"] if meta is not None else 0)
        n_train = sum(x.size for x in jax.tree.leaves(state["params"]))
        loop.log(f"finetune ({ft.method}{', LoRA r=%d' % ft.lora.rank if trainer.lora else ''}) from "
                 f"{ft.init_from} step {ft.init_step}: {len(train_set.items)} examples, {n_train / 1e6:.3f}M "
                 f"trainable parameters")
    return trainer, tok, state, data_iter, batches, meta["step"] if meta is not None else None


def _eval_batches(cfg: Config, items: list[Any], dpo: bool, max_batches: int) -> list[dict[str, np.ndarray]]:
    """This process's evaluation batches, padded with empty ones so every process runs as many steps:
    each process builds every shard (cheap) to know the largest count."""
    per_process, n = cfg.train.batch_size // jax.process_count(), jax.process_count()
    if cfg.finetune.method == "classify":
        shards = [classify_eval_batches(items, seq_len=cfg.data.seq_len, batch_size=per_process, shard_index=i,
                                        shard_count=n, max_batches=max_batches) for i in range(n)]
    else:
        shards = [eval_batches(items[i::n], dpo=dpo, seq_len=cfg.data.seq_len, batch_size=per_process,
                               max_batches=max_batches) for i in range(n)]
    template = next(s[0] for s in shards if s)
    return pad_to_same_count(shards[jax.process_index()], [len(s) for s in shards], template)


def evaluate_classifier(run_dir: str | Path, cfg: Config, split: str = "validation") -> dict[str, Any]:
    """``qkv evaluate`` of a classifier run: loss and accuracy on finetune.eval_path (or the TFDS split)."""
    trainer = FinetuneTrainer(cfg)
    state, meta = checkpoint.restore(run_dir, trainer.abstract_state, with_optimizer=False)
    tok = Tokenizer.from_bytes(checkpoint.decode_tokenizer(meta["tokenizer"]))
    path = cfg.finetune.eval_path or (None if cfg.data.source == "tfds" else cfg.finetune.train_path)
    loaded = _load_examples(cfg, tok, path, split)
    result = run_finetune_eval(trainer, state["params"], _eval_batches(cfg, loaded.items, False, max_batches=0))
    return {"step": meta["step"], "split": split, "labels": cfg.finetune.labels, **result,
            "truncated": loaded.truncated}
