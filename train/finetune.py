"""``qkv finetune``: SFT, DPO and classification from an existing checkpoint, fully or with LoRA.

A fine-tuning run starts from the parameters of ``finetune.init_from`` (a run written by ``qkv
pretrain``, ``qkv convert import``, ``merge-lora`` or another full fine-tune) and writes a new run
directory laid out like a pretraining run. The model config and tokenizer come from the init
checkpoint; model keys set in the fine-tuning config override it (shape changes are refused by the
shape check, naming the parameter). Presets (sft-tiny, lora-tiny, dpo-tiny) are ordinary presets
read by ``load_config``'s reader; ``load_finetune_config`` only resolves ``init_from``.

Fine-tuning is an objective, not a second trainer: the one train step (train/step.py) optimizes
``objectives.sft``, ``objectives.dpo`` or ``objectives.classify``, and the one lifecycle
(``train.loop.run``) runs it; this module supplies the :class:`FinetuneJob` (data, base parameters).
The state's ``params`` hold what is trained: the whole model, or only the LoRA adapters
(``finetune.lora.rank > 0``, train/lora.py). Frozen arrays — the base model under LoRA, the
reference model of DPO — are the trainer's ``frozen`` argument: never in the optimizer, never saved
(the run's config names ``init_from`` and the fixed ``init_step`` instead, and they are reloaded).

DPO: rows come in (chosen, rejected) pairs sharing a prompt; the loss is −log σ(β[(π_c − π_ref,c) −
(π_r − π_ref,r)]), averaged over pairs (train/objectives.py). Without ``finetune.eval_path`` a seeded
``finetune.eval_fraction`` of the training examples is held out for evaluation.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qkv.data import (ClassifyIterator, Tokenizer, classify_eval_batches, classify_examples, infer_labels, read_labeled,
                      tfds_labeled)
from qkv.data.chat_template import ChatTemplate, template_for
from qkv.data.sft import DPOIterator, PackedSFTIterator, eval_batches, load_dpo, load_sft

from . import checkpoint, objectives
from .config import Config, TrainConfig, config_data, config_from_dict
from .distributed import is_main_process, log
from .lora import init_lora, merge_lora
from .loop import Job, Report, build_trainer, check_resumable, run
from .sharding import replicated
from .step import Trainer
from qkv.errors import UserError


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
        raise UserError(f"finetune.init_from={init_from!r} is a LoRA run: merge it first with "
                        "qkv convert merge-lora RUN_DIR OUT_DIR and start from OUT_DIR")
    if "tokenizer" not in meta:
        raise UserError(f"finetune.init_from={init_from!r} has no tokenizer: convert it again with --tokenizer")
    return str(path), int(meta["step"]), meta


def load_finetune_config(source: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The fine-tuning config: a preset or YAML file + overrides (``config_data``, like every run), with the
    model section taken from ``finetune.init_from`` (keys set explicitly override it), ``init_from``
    made absolute and ``init_step`` fixed."""
    data = config_data(source or "sft-tiny", overrides)
    ft = data.get("finetune") or {}
    if not isinstance(ft, dict) or not ft.get("init_from"):
        raise UserError("finetune.init_from=RUN_DIR is required: the checkpoint to fine-tune")
    from_tfds = ft.get("method") == "classify" and (data.get("data") or {}).get("source") == "tfds"
    if not ft.get("train_path") and not from_tfds:
        raise UserError("finetune.train_path=FILE.jsonl is required: the training examples")
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
        raise UserError(f"finetune.method=classify needs an encoder checkpoint (model.kind=encoder): "
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
        raise UserError("data.source=tfds needs data.tfds_name=NAME (e.g. glue/sst2)")
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


# ---------------------------------------------------------------------------------------------
# The run


def objective_for(cfg: Config) -> objectives.Objective:
    """What ``finetune.method`` optimizes (train/objectives.py)."""
    if cfg.finetune.method == "dpo":
        return objectives.dpo(cfg.finetune.dpo_beta)
    return objectives.classify() if cfg.finetune.method == "classify" else objectives.sft()


_CACHED: dict[str, Trainer] = {}


def finetune_trainer(cfg: Config) -> Trainer:
    """The trainer of a fine-tuning run: its objective, LoRA adapters or the whole model, a frozen DPO
    reference. The previous run's trainer in this process is reused when everything compiled into it
    is the same (a resumed or repeated run then skips recompiling its steps)."""
    ft = cfg.finetune
    if (ft.method == "classify") != bool(cfg.model.n_classes) or (ft.method == "classify" and ft.lora.rank):
        raise UserError("finetune.method=classify trains an encoder (model.kind=encoder) with model.n_classes set, "
                        "fully (finetune.lora.rank=0); other methods need a model without a class head")
    if ft.method == "dpo" and (cfg.train.batch_size // jax.process_count()) % (2 * cfg.optim.grad_accum):
        raise UserError(f"train.batch_size={cfg.train.batch_size} rows must hold whole (chosen, rejected) pairs "
                        f"in every micro-batch and process: make it a multiple of 2 x optim.grad_accum x processes")
    d = cfg.to_dict()
    key = json.dumps({"model": d["model"], "optim": d["optim"], "mesh": d["mesh"], "devices": str(jax.devices()),
                      "train": [cfg.train.steps, cfg.train.seed, cfg.train.batch_size, cfg.train.skip_nonfinite],
                      "finetune": [ft.method, ft.dpo_beta, d["finetune"]["lora"]]}, sort_keys=True, default=str)
    if key not in _CACHED:
        _CACHED.clear()
        _CACHED[key] = build_trainer(cfg, objective=objective_for(cfg), lora=ft.lora, reference=ft.method == "dpo")
    return _CACHED[key]


def load_examples(cfg: Config, tok: Tokenizer, path: str | None, split: str = "train",
                  template: ChatTemplate | None = None):
    """The examples of ``path`` (classify with data.source=tfds: of the TFDS ``split``) for the method."""
    ft = cfg.finetune
    if ft.method == "classify":
        if path is None:  # data.source=tfds
            records, _ = _tfds_records(cfg.to_dict(), {"label_field": ft.label_field}, split)
        else:
            records = read_labeled(path, text_field=cfg.data.text_field, label_field=ft.label_field)
        return classify_examples(records, tok.encode, bos_id=tok.bos_id, eos_id=tok.eos_id, seq_len=cfg.data.seq_len,
                                 labels=ft.labels)
    load = load_dpo if ft.method == "dpo" else load_sft
    return load(path, tok.encode, bos_id=tok.bos_id, eos_id=tok.eos_id, seq_len=cfg.data.seq_len, overlong=ft.overlong,
                template=template, tokenizer=tok if template is not None else None)


def hold_out(items: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """(training items, held-out items): a seeded ``fraction`` (at least one item, and at least one left
    to train on) set aside for evaluation, the rest in their original order. Nothing is held out when
    ``fraction`` is 0 or there are fewer than two items: both are then the whole list."""
    n_out = min(max(1, round(fraction * len(items))), len(items) - 1) if fraction > 0 else 0
    if n_out <= 0:
        return items, items
    picked = set(np.random.default_rng([seed, len(items)]).permutation(len(items))[:n_out].tolist())
    return ([x for i, x in enumerate(items) if i not in picked], [x for i, x in enumerate(items) if i in picked])


def finetune_eval_batches(cfg: Config, items: list[Any], max_batches: int) -> list[dict[str, np.ndarray]]:
    """This process's share of the evaluation batches (the evaluation loop pads every process to the
    same count)."""
    per_process, i, n = cfg.train.batch_size // jax.process_count(), jax.process_index(), jax.process_count()
    if cfg.finetune.method == "classify":
        return classify_eval_batches(items, seq_len=cfg.data.seq_len, batch_size=per_process, shard_index=i,
                                     shard_count=n, max_batches=max_batches)
    return eval_batches(items[i::n], dpo=cfg.finetune.method == "dpo", seq_len=cfg.data.seq_len,
                        batch_size=per_process, max_batches=max_batches)


class FinetuneJob(Job):
    """Fine-tuning: examples from JSONL (or TFDS), parameters and tokenizer from ``finetune.init_from``."""

    name = "finetune"

    def __init__(self, cfg: Config, run_dir: Path):
        if run_dir == Path(cfg.finetune.init_from):
            raise UserError("train.run_dir is finetune.init_from: write the fine-tuned run to a new directory")
        super().__init__(cfg, finetune_trainer(cfg))
        self.base: Any = None
        self.n_examples = 0

    def check_meta(self, meta: dict[str, Any], run_dir: Path) -> None:
        check_resumable(self.cfg, meta, run_dir)
        saved = config_from_dict(meta["config"]).finetune
        for key in ("method", "init_from", "init_step", "train_path", "lora", "eval_path", "eval_fraction"):
            if getattr(saved, key) != getattr(self.cfg.finetune, key):
                raise UserError(f"{run_dir} holds a run with finetune.{key}={getattr(saved, key)!r}, not "
                                f"{getattr(self.cfg.finetune, key)!r}: use another train.run_dir or keep the saved "
                                "settings")

    def _base(self) -> Any:
        if self.base is None:
            self.base = load_base_params(self.cfg, self.trainer.base_abstract)[0]
        return self.base

    def tokenizer(self, run_dir: Path, meta: dict[str, Any] | None) -> Tokenizer:
        ft = self.cfg.finetune
        meta = meta if meta is not None else checkpoint.read_meta(ft.init_from, ft.init_step)
        tok = checkpoint.read_tokenizer(meta)
        if tok.vocab_size > self.cfg.model.vocab_size:
            raise UserError(f"the init checkpoint's tokenizer has {tok.vocab_size} pieces but model.vocab_size="
                            f"{self.cfg.model.vocab_size}")
        return tok

    def data(self, tok: Tokenizer):
        cfg, ft = self.cfg, self.cfg.finetune
        init_meta = checkpoint.read_meta(ft.init_from, ft.init_step)
        template = template_for(init_meta, tok, cfg.tokenizer.chat_template, cfg.tokenizer.chat_template_kwargs)
        self.chat = {k: init_meta[k] for k in ("eos_ids",) if k in init_meta}  # kept in every checkpoint's meta
        if not template.is_plain:
            self.chat["chat_template"] = template.source
        train_set = load_examples(cfg, tok, ft.train_path, template=template)
        train_items, eval_items = train_set.items, None
        if ft.eval_path or (ft.method == "classify" and not ft.train_path):  # an eval file, or the TFDS validation split
            eval_set = load_examples(cfg, tok, ft.eval_path, "validation", template=template)
            eval_items = eval_set.items
        else:
            eval_set = train_set
            train_items, eval_items = hold_out(train_set.items, ft.eval_fraction, cfg.train.seed)
            if eval_items is train_items:
                log(f"evaluating on the training examples ({len(train_items)}: too few to hold any out, or "
                    "finetune.eval_fraction=0); set finetune.eval_path for a separate evaluation set")
            else:
                log(f"held out {len(eval_items)} of {len(train_set.items)} training examples for evaluation "
                    f"(finetune.eval_fraction={ft.eval_fraction}, seed {cfg.train.seed}; or set finetune.eval_path)")
        for what, s in (("training", train_set), ("evaluation", eval_set))[:1 if eval_set is train_set else 2]:
            if getattr(s, "skipped", 0):
                log(f"skipped {s.skipped} {what} examples longer than data.seq_len={cfg.data.seq_len} "
                    "(finetune.overlong=skip)")
            if getattr(s, "truncated", 0):
                log(f"truncated {s.truncated} of {len(s.items)} {what} texts to data.seq_len={cfg.data.seq_len}")
        items = train_items[jax.process_index()::jax.process_count()]
        if not items:
            raise UserError(f"{ft.train_path} has fewer examples than there are processes ({jax.process_count()})")
        self.n_examples = len(train_items)
        make = {"classify": ClassifyIterator, "dpo": DPOIterator}.get(ft.method, PackedSFTIterator)
        data_iter = make(items, seq_len=cfg.data.seq_len, batch_size=cfg.train.batch_size // jax.process_count(),
                         seed=cfg.train.seed)
        batches = finetune_eval_batches(cfg, eval_items, cfg.data.eval_batches)
        return data_iter, lambda: batches

    def init_state(self):
        state = self.trainer.init_state(self._base())
        if self.cfg.finetune.method == "dpo" and self.trainer.lora is None:  # the state's copy is donated
            self.base = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=self.trainer.base_shardings)(self.base)
        return state

    def frozen(self) -> Any:
        return self._base() if self.trainer.frozen_shardings is not None else None

    def started(self, state) -> None:
        ft = self.cfg.finetune
        if is_main_process():
            n_train = sum(x.size for x in jax.tree.leaves(state["params"]))
            log(f"finetune ({ft.method}{', LoRA r=%d' % ft.lora.rank if ft.lora.rank else ''}) from {ft.init_from} "
                f"step {ft.init_step}: {self.n_examples} examples, {n_train / 1e6:.3f}M trainable parameters")
        if self.trainer.frozen_shardings is None:
            self.base = None  # full fine-tuning: the state holds the model now


def finetune(cfg: Config, report: Report | None = None) -> dict[str, Any]:
    """Fine-tune (or resume) the run in ``cfg.train.run_dir``; returns a summary like ``pretrain``
    (``report``, e.g. ``qkv.inference.report.finetune_report(cfg)``, adds a sample)."""
    from_tfds = cfg.finetune.method == "classify" and cfg.data.source == "tfds"
    if not cfg.finetune.init_from or not (cfg.finetune.train_path or from_tfds):
        raise UserError("finetune needs finetune.init_from and finetune.train_path (use load_finetune_config)")
    summary = run(cfg, lambda run_dir: FinetuneJob(cfg, run_dir), report)
    summary["trainable_params"] = summary.pop("params")
    return summary
