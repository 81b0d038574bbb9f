"""The run configuration: typed dataclasses built from a YAML preset plus ``key=value`` overrides.

Every error names the offending key and what is allowed, e.g.
``train.steps='many' must be an integer`` or ``unknown key 'model.d_modl': did you mean model.d_model?``.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from qkv.data.chat_template import check_template_kwargs
from qkv.model import ModelConfig

from .validate import check_mixture, check_section
from qkv.errors import UserError


@dataclass(frozen=True)
class DataConfig:
    # decoder/encoder text: stdlib (this Python's own .py files), files, jsonl, tfds (e.g. lm1b);
    # encoder_decoder pairs: toy (numbers -> English words, built in), pairs (TSV/JSONL/two files), tfds (wmt14_translate/de-en)
    # parquet, hf (save_to_disk dir or an HF dataset's data files) and compressed jsonl stream from their shards
    # (data/streams.py, docs/data.md); so do data.stream=true and data.mixture
    source: Literal["stdlib", "files", "jsonl", "tfds", "toy", "pairs", "parquet", "hf", "prepared"] = "stdlib"
    path: str | None = None  # directory or glob for files/jsonl; the pairs file (may contain {split})
    target_path: str | None = None  # source=pairs from two line-aligned files: path = sources, target_path = targets
    tfds_name: str | None = None  # catalog name for source=tfds, e.g. lm1b
    text_field: str = "text"
    source_field: str = "source"  # JSONL pairs: the fields; TFDS translation: the language codes
    target_field: str = "target"
    data_dir: str = "~/.cache/qkv/tfds"  # where TFDS datasets are built and read
    validation_fraction: float = 0.01
    train_split: str = "train"  # TFDS split expression, slices included: train, train[:99%], train+validation
    eval_split: str = ""  # "": validation, else test, else a held-out slice of train (said in the log)
    seq_len: int = 256  # tokens per row (encoder_decoder: of the target side)
    source_seq_len: int = 0  # encoder_decoder: tokens per row on the source side (0: data.seq_len)
    toy_limit: int = 10_000  # source=toy: translate the numbers below this (split 90/5/5 % by a fixed hash)
    eval_batches: int = 8  # validation batches per evaluation (0: whole split)
    shuffle_rows: int = 1024  # packed training rows shuffled together in one window (0/1: rows in document order)
    # Streamed, sharded sources (docs/data.md): read in place, packed on the fly, position checkpointed.
    stream: bool = False  # source=jsonl: stream the files instead of building a TFDS dataset first
    token_field: str = ""  # parquet/jsonl/hf: a column of token ids already tokenized (needs tokenizer.path)
    eval_path: str = ""  # streamed source: its own evaluation shards ("": hold out validation_fraction of rows)
    mixture: list | None = None  # [{kind, path, weight, text_field?, token_field?, eval_path?, name?}]


    def __post_init__(self) -> None:
        check_section("data", self)
        check_mixture(self)

    @property
    def streamed(self) -> bool:
        """Whether the text is streamed from shards (data/mixture.py) instead of built into TFDS first."""
        from qkv.data.streams import compressed_or_remote

        return bool(self.mixture) or self.source in ("parquet", "hf", "prepared") or (self.source == "jsonl" and (
            self.stream or compressed_or_remote(self.path)))

    @property
    def source_len(self) -> int:
        return self.source_seq_len or self.seq_len


@dataclass(frozen=True)
class TokenizerConfig:
    path: str | None = None  # an existing SentencePiece .model; None: train one from the corpus
    model_type: Literal["bpe", "unigram", "char"] = "bpe"
    train_documents: int = 400  # documents sampled from the training split to train it
    # The chat template for `messages` records and chat (docs/chat.md): a .jinja file or a Hugging Face
    # directory; None: the init checkpoint's (read at `qkv convert import`), else qkv's plain template.
    chat_template: str | None = None
    # Keyword arguments the template is rendered with in training and chat, e.g. {enable_thinking: false} for
    # Qwen 3 (each must be a variable the template reads; docs/chat.md).
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_section("tokenizer", self)
        check_template_kwargs(self.chat_template_kwargs, "tokenizer.chat_template_kwargs")


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["adamw", "muon"] = "adamw"  # muon: orthogonalised momentum for weight matrices, AdamW for the rest
    learning_rate: float = 3e-3
    muon_learning_rate: float = 0.02  # muon's own peak learning rate (same schedule); AdamW keeps learning_rate
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of the peak
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clipping; 0 disables
    grad_accum: int = 1  # micro-batches per step
    z_loss: float = 0.0  # weight of log(Z)² to keep logits from drifting
    label_smoothing: float = 0.0  # ε: targets become (1 − ε)·onehot + ε/vocab (0.1 in the original Transformer)

    def __post_init__(self) -> None:
        check_section("optim", self)


@dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # -1: all devices not used by the other axes
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1  # expert parallelism: a mixture of experts' experts split this many ways (model/moe.py)
    # several TPU slices joined over the data-center network (DCN): the data / fsdp axes span this many slices
    # (times mesh.data / mesh.fsdp chips inside each); docs/moe.md "Multi-slice"
    dcn_data: int = 1
    dcn_fsdp: int = 1
    rules: dict[str, Any] = field(default_factory=dict)  # overrides of the logical-axis rules table

    def __post_init__(self) -> None:
        check_section("mesh", self)


@dataclass(frozen=True)
class TrainConfig:
    run_dir: str = "runs/tiny"
    steps: int = 300  # length of the run (sets the learning-rate schedule)
    stop_at_step: int = 0  # stop early at this step with a checkpoint (0: run to train.steps); rerun to resume
    batch_size: int = 16  # global, across all devices and processes
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    sample_prompt: str = "def "
    sample_tokens: int = 64
    progress: bool = True
    distributed: Literal["auto", "on", "off"] = "auto"  # initialise jax.distributed from the environment
    skip_nonfinite: bool = False  # skip (do not apply) an update whose loss or gradient norm is NaN/Inf
    spike_rewind: bool = False  # on a loss spike, rewind to the last checkpoint and skip the spike's batches (train/rewind.py)
    spike_window: int = 100  # steps of loss history for the robust threshold; also the window for spike_max_rewinds
    spike_k: float = 6.0  # a spike: loss > median + spike_k * MAD of the window
    spike_grad_factor: float = 10.0  # ... or gradient norm > this many times its median
    spike_max_rewinds: int = 3  # this many rewinds within one window stop the run (exit 3)

    def __post_init__(self) -> None:
        check_section("train", self)


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 0  # 0: full fine-tuning; > 0: train only low-rank adapters (see docs/finetuning.md)
    alpha: float = 16.0  # the adapter update is (alpha / rank) * A @ B
    targets: list[str] = field(default_factory=lambda: ["wq", "wv"])  # wq wk wv attn.wo wi wg mlp.wo, attention, mlp, all

    def __post_init__(self) -> None:
        check_section("finetune.lora", self)


@dataclass(frozen=True)
class FinetuneConfig:
    """``qkv finetune``: SFT or DPO from an existing checkpoint (ignored by ``qkv pretrain``)."""

    method: Literal["sft", "dpo", "classify"] = "sft"  # classify: an encoder's class head on labeled text
    init_from: str | None = None  # run directory to start from (params only; model config and tokenizer too)
    init_step: int | None = None  # its checkpoint step (None: newest, fixed at the first start)
    train_path: str | None = None  # JSONL file or glob (classify: none needed with data.source=tfds, e.g. glue/sst2)
    labels: list | None = None  # classify: the class names (None: the sorted labels of the training data)
    label_field: str = "label"  # classify: the JSONL/TFDS field holding the label (data.text_field: the text)
    eval_path: str | None = None  # JSONL file or glob for evaluation (None: hold out eval_fraction of the training set)
    eval_fraction: float = 0.05  # without eval_path: the seeded share of training examples held out (at least 1)
    overlong: Literal["error", "skip"] = "error"  # an example longer than data.seq_len: stop, or skip and count
    dpo_beta: float = 0.1
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        check_section("finetune", self)


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def __post_init__(self) -> None:
        check_section("model", self.model)  # the other sections check themselves when built
        if max(self.data.seq_len, self.data.source_len) > self.model.max_seq_len:
            key = "seq_len" if self.data.seq_len > self.model.max_seq_len else "source_seq_len"
            raise UserError(
                f"data.{key}={getattr(self.data, key)} exceeds model.max_seq_len={self.model.max_seq_len}: "
                f"lower data.{key} or raise model.max_seq_len"
            )
        if self.train.batch_size % self.optim.grad_accum:
            raise UserError(
                f"train.batch_size={self.train.batch_size} is not divisible by optim.grad_accum={self.optim.grad_accum}"
            )
        if self.optim.name == "muon" and self.finetune.lora.rank > 0:
            raise UserError(
                f"optim.name=muon cannot train LoRA adapters (finetune.lora.rank={self.finetune.lora.rank}): use "
                "optim.name=adamw, or finetune.lora.rank=0 for a full fine-tune with Muon"
            )
        if self.data.source in ("files", "jsonl", "pairs") and not self.data.path:
            raise UserError(f"data.source={self.data.source} needs data.path=DIR_OR_GLOB")
        if self.data.source == "tfds" and not self.data.tfds_name:
            raise UserError("data.source=tfds needs data.tfds_name=NAME (e.g. lm1b)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Parsing


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(value, option, key)
            except UserError as err:
                errors.append(str(err))
        raise UserError(errors[0] if errors else f"{key}={value!r} is not allowed")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise UserError(f"{key}={value!r} is not allowed: choose {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is dict or tp is dict:
        if isinstance(value, dict):
            return dict(value)
    else:
        return value
    name = _type_name(tp)
    hint = _TYPE_HINTS.get(get_origin(tp) or tp, "")
    raise UserError(f"{key}={value!r} must be {'an' if name[0] in 'aeiou' else 'a'} {name}{hint}")


_TYPE_HINTS = {int: ": write whole digits, e.g. 100 (not 1e2)", float: ": write a number, e.g. 3e-4",
               bool: ": use true or false", str: ": quote the value, e.g. 'text'",
               dict: ": write a mapping, e.g. {key: value}"}


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys and wrong types."""
    where = prefix or "config"
    if not isinstance(data, dict):
        raise UserError(f"{where} must be a mapping of keys to values, got {type(data).__name__}: write it as "
                        f"{where + ': ' if prefix else ''}{{key: value, ...}} (qkv config tiny prints every section)")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f": did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else f": allowed keys are {', '.join(names)}"
            raise UserError(f"unknown config key {full!r}{hint}")
        kwargs[key] = _coerce(value, hints[key], full)
    try:
        return cls(**kwargs)
    except TypeError as err:  # a frozen dataclass refusing arguments: report it plainly
        raise UserError(f"{where}: {err}") from None


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"override {dotted!r}: {part!r} is a value, not a section")
    node[parts[-1]] = value


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (not "last wins")."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                earlier = seen.get(key)
            except TypeError:  # an unhashable key: let the base class report it
                break
            if earlier is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {earlier.line + 1}, again on line "
                    f"{key_node.start_mark.line + 1}): keep one of them", key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str) -> Any:
    """YAML (1.1, safe types only) with duplicate keys refused."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def parse_override(text: str) -> tuple[str, Any]:
    """``section.key=value`` with the value read as YAML (so 3, 3e-4, true, null, [a, b] work)."""
    if "=" not in text:
        raise UserError(f"override {text!r} must look like section.key=value, e.g. train.steps=100")
    key, raw = text.split("=", 1)
    try:
        value = parse_yaml(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in importlib.resources.files("qkv.configs").iterdir() if p.name.endswith(".yaml"))


def read_yaml(source: str | Path | None) -> dict[str, Any]:
    """A preset name (``tiny``), or a path to a YAML file; None means the ``tiny`` preset."""
    source = "tiny" if source is None else str(source)
    if source in preset_names():
        text = importlib.resources.files("qkv.configs").joinpath(f"{source}.yaml").read_text()
    else:
        path = Path(source)
        if not path.is_file():
            raise UserError(f"config {source!r} is neither a preset ({', '.join(preset_names())}) nor a YAML file")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise UserError(f"config {source!r} is not a text file (byte {err.start} is not UTF-8): "
                            "give a YAML file or a preset name") from None
    try:
        data = parse_yaml(text)
    except yaml.YAMLError as err:
        raise UserError(f"config {source!r} is not valid YAML: {_yaml_problem(err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config {source!r} must be a mapping of sections, got a {type(data).__name__}: write it "
                        "as section: {key: value} mappings (qkv config tiny prints one)")
    return data


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line: the problem and its place, e.g. 'duplicate key 'steps' (...) (line 4, column 3)'."""
    problem = getattr(err, "problem", None)
    mark = getattr(err, "problem_mark", None)
    if problem:
        return problem + (f" (line {mark.line + 1}, column {mark.column + 1})" if mark else "")
    return str(err).splitlines()[0]


def config_data(source: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The nested dict of a preset or YAML file with ``key=value`` overrides applied (not yet validated):
    the one way into the configuration, for pretraining and fine-tuning presets alike."""
    data = read_yaml(source)
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(data, key, value)
    return data


def load_config(source: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The validated run configuration for a preset or YAML file plus ``key=value`` overrides."""
    return from_dict(Config, config_data(source, overrides))


def split_config_args(args: list[str] | tuple[str, ...]) -> tuple[str | None, list[str]]:
    """(preset or YAML path, key=value overrides) of a command line: the first argument is the config
    source unless it is already an override. Every subcommand reads its configuration this way."""
    args = list(args)
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def config_from_dict(data: dict[str, Any]) -> Config:
    return from_dict(Config, data)
