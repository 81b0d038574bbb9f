"""What a model family learns from, in one registry: its data and its objective.

``task_for(cfg)`` names the task of a run from ``model.kind`` — the only place training branches on it:

  lm        decoder: next-token prediction on packed text (stdlib, files, jsonl, tfds)
  mlm       encoder: masked-language modelling on the same packed text (train/mlm.py, on the device)
  seq2seq   encoder_decoder: target given source, teacher-forced (toy, pairs, tfds translation)

(Encoder classification is a fine-tuning method: ``qkv finetune finetune.method=classify``.)
Each task gives the loop the same things: ``open(split)`` a random-access source, ``texts(source)``
to train the tokenizer on, ``train_iter`` (checkpointable: ``get_state``/``set_state``),
``eval_batches`` (this process's; the evaluation loop pads every process to the same count) and
``objective()`` (train/objectives.py: what the one train step optimizes, MLM masking included).
End-of-run reports (a sample, BLEU) live in qkv.inference.report.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Iterator

import jax
import numpy as np

from qkv.data import (MixtureIterator, RowStream, Texts, open_sources, Seq2SeqIterator, Tokenizer, load_pairs, make_eval_dataset, make_lm_dataset, open_text_source,
                      PairTexts, seq2seq_eval_batches, tfds_pairs, tokenize_pairs, toy_pairs)

from . import objectives
from .config import Config
from .distributed import log
from qkv.errors import UserError

Batch = dict[str, np.ndarray]
TEXT_SOURCES = ("stdlib", "files", "jsonl", "tfds", "parquet", "hf", "prepared")
PAIR_SOURCES = ("toy", "pairs", "tfds")


def with_target_bytes(batches: Iterable[Batch], byte_lengths: np.ndarray | None) -> Iterator[Batch]:
    """Each batch with ``target_bytes``: the UTF-8 bytes of each counted target (``Tokenizer.byte_lengths``),
    which the evaluation sums for bits per byte; the batches as they are when ``byte_lengths`` is None."""
    for batch in batches:
        yield batch if byte_lengths is None else {
            **batch, "target_bytes": byte_lengths[batch["targets"]] * (batch["loss_mask"] > 0)}


class LMTask:
    """Decoder-only language modelling: predict each next token of packed documents."""

    name, sources, with_mask = "lm", TEXT_SOURCES, False

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self._eval_cache: tuple[Any, list[Batch]] | None = None  # (source, its batches): built once per run
        if cfg.data.source not in self.sources:
            raise UserError(f"data.source={cfg.data.source} cannot train model.kind={cfg.model.kind}: "
                            f"use data.source={'|'.join(self.sources)}")

    def open(self, split: str):
        d = self.cfg.data
        if d.streamed:  # both splits come from the same shards (data/mixture.py says how they are split)
            return open_sources(self.stream_entries())
        return open_text_source(d.source, d.path, split, Path(d.data_dir).expanduser(), text_field=d.text_field,
                                tfds_name=d.tfds_name, validation_fraction=d.validation_fraction,
                                train_split=d.train_split, eval_split=d.eval_split)

    def texts(self, source) -> Sequence[str]:
        if not self.cfg.data.streamed:
            return source
        if any(e.get("token_field") or e["kind"] == "prepared" for e in self.stream_entries()) and not self.cfg.tokenizer.path:
            raise UserError("a source reads token ids (token_field), so no tokenizer can be trained on it: set "
                            "tokenizer.path to the SentencePiece .model the ids come from")
        n = self.cfg.tokenizer.train_documents
        texts = Texts()
        for s, w in zip(source, MixtureIterator.shares(source)):
            texts.extend(self._streams(None, [s], "train")[0].texts(max(1, round(n * w))))
        return texts

    def stream_entries(self) -> list[dict[str, Any]]:
        d = self.cfg.data
        if d.mixture is not None:
            return list(d.mixture)
        return [{"kind": d.source, "path": d.path, "text_field": d.text_field, "token_field": d.token_field,
                 "eval_path": d.eval_path, "weight": 1.0, "name": d.source}]

    def _streams(self, tok: Tokenizer | None, sources, split: str) -> list[RowStream]:
        d, t = self.cfg.data, self.cfg.train
        return [RowStream(s, tok.encode if tok else list, split=split, seq_len=d.seq_len, seed=t.seed,
                          bos_id=tok.bos_id if tok else 1, eos_id=tok.eos_id if tok else 2,
                          validation_fraction=d.validation_fraction,
                          shuffle_rows=d.shuffle_rows if split == "train" else 0,
                          num_epochs=None if split == "train" else 1,
                          process_index=jax.process_index(), process_count=jax.process_count()) for s in sources]

    def train_iter(self, tok: Tokenizer, source):
        if self.cfg.data.streamed:
            per_process = self.cfg.train.batch_size // jax.process_count()
            return MixtureIterator(self._streams(tok, source, "train"), [s.weight for s in source], per_process)
        per_process = self.cfg.train.batch_size // jax.process_count()
        return iter(make_lm_dataset(source, tok.encode, seq_len=self.cfg.data.seq_len, batch_size=per_process,
                                    seed=self.cfg.train.seed, shard_index=jax.process_index(),
                                    shard_count=jax.process_count(), bos_id=tok.bos_id, eos_id=tok.eos_id,
                                    shuffle_rows=self.cfg.data.shuffle_rows))

    def eval_batches(self, tok: Tokenizer, source) -> Iterator[Batch]:
        """At most ``data.eval_batches`` validation batches of this process's shard (0: the whole shard,
        streamed), built once per run and reused at every evaluation."""
        if not self.cfg.data.eval_batches:
            return with_target_bytes(self._stream_eval_batches(tok, source), self.byte_lengths(tok))
        return with_target_bytes(self._cached_eval_batches(source, lambda: list(self._stream_eval_batches(tok, source))),
                                 self.byte_lengths(tok))

    def _cached_eval_batches(self, source, build) -> Iterator[Batch]:
        if self._eval_cache is None or self._eval_cache[0] is not source:
            self._eval_cache = (source, build())
        return iter(self._eval_cache[1])

    def _stream_eval_batches(self, tok: Tokenizer, source) -> Iterator[Batch]:
        cfg = self.cfg
        per_process = cfg.train.batch_size // jax.process_count()
        if cfg.data.streamed:
            ds = MixtureIterator(self._streams(tok, source, "validation"), [s.weight for s in source], per_process,
                                 finite=True)
            return itertools.islice(ds, cfg.data.eval_batches or None)
        ds = make_eval_dataset(source, tok.encode, seq_len=cfg.data.seq_len, batch_size=per_process,
                               bos_id=tok.bos_id, eos_id=tok.eos_id, shard_index=jax.process_index(),
                               shard_count=jax.process_count())
        return itertools.islice(iter(ds), cfg.data.eval_batches or None)

    def source_evals(self, tok: Tokenizer, source) -> dict[str, Any]:
        """A mixture's sources' own validation batches (one maker per source); {} for one source."""
        if not self.cfg.data.streamed or len(source) < 2:
            return {}
        return {s.name: (lambda s=s: with_target_bytes(self._stream_eval_batches(tok, [s]), self.byte_lengths(tok)))
                for s in source}

    def objective(self) -> objectives.Objective:
        """Next-token cross-entropy (with the optimizer's z-loss and label smoothing)."""
        return objectives.lm(self.cfg.optim.z_loss, self.cfg.optim.label_smoothing)

    def byte_lengths(self, tok: Tokenizer) -> np.ndarray | None:
        """UTF-8 bytes per token id, for bits per byte of the targets (None where that means nothing)."""
        return tok.byte_lengths()

    def check_tokenizer(self, tok: Tokenizer) -> None:
        if tok.vocab_size > self.cfg.model.vocab_size:
            raise UserError(f"the tokenizer has {tok.vocab_size} pieces but model.vocab_size={self.cfg.model.vocab_size}: "
                            f"set model.vocab_size={tok.vocab_size} or use a smaller tokenizer")

class MLMTask(LMTask):
    """Encoder-only masked-language modelling (BERT): recover 15 % of the tokens from both sides."""

    name, with_mask = "mlm", True

    def objective(self) -> objectives.Objective:
        """Cross-entropy on the masked tokens, masked on the device (train/mlm.py)."""
        return objectives.mlm(self.cfg.model.vocab_size, self.cfg.optim.z_loss, self.cfg.optim.label_smoothing)

    def byte_lengths(self, tok: Tokenizer) -> None:
        return None  # the loss covers the 15 % masked tokens only, not the text's bytes

    def check_tokenizer(self, tok: Tokenizer) -> None:
        super().check_tokenizer(tok)
        if tok.mask_id is None:
            raise UserError("the tokenizer has no <mask> piece for masked-language modelling: leave tokenizer.path "
                            "unset so qkv trains one with it (qkv.data.train_tokenizer(..., with_mask=True))")

class Seq2SeqTask(LMTask):
    """Encoder-decoder: the target given the source, with teacher forcing (and optional label smoothing)."""

    name, sources = "seq2seq", PAIR_SOURCES

    def open(self, split: str):
        d = self.cfg.data
        if d.source == "toy":
            return toy_pairs(split, d.toy_limit)
        if d.source == "tfds":
            if not d.tfds_name:
                raise UserError("data.source=tfds needs data.tfds_name=NAME (e.g. wmt14_translate/de-en)")
            return tfds_pairs(d.tfds_name, split, Path(d.data_dir).expanduser(), d.source_field, d.target_field,
                              d.train_split, d.eval_split)
        return load_pairs(d.path, split, target_path=d.target_path, source_field=d.source_field,
                          target_field=d.target_field)

    def texts(self, source) -> Sequence[str]:
        return PairTexts(source)

    def _examples(self, tok: Tokenizer, pairs):
        """Tokenized pairs; local files must be clean (errors name file:line), while the rare empty or
        overlong pairs of a TFDS corpus are left out and counted."""
        d = self.cfg.data
        lenient = "skip" if d.source == "tfds" else "error"
        out = tokenize_pairs(pairs, tok.encode, bos_id=tok.bos_id, eos_id=tok.eos_id, src_len=d.source_len,
                             tgt_len=d.seq_len, overlong=lenient, empty=lenient)
        if out.skipped or out.empty:
            log(f"left out {out.skipped} pairs longer than data.source_seq_len/seq_len and {out.empty} with an empty side")
        return out.items

    def train_iter(self, tok: Tokenizer, source):
        per_process = self.cfg.train.batch_size // jax.process_count()
        examples = self._examples(tok, source)[jax.process_index()::jax.process_count()]
        if not examples:
            raise UserError(f"the training pairs are fewer than the {jax.process_count()} processes")
        return Seq2SeqIterator(examples, src_len=self.cfg.data.source_len, tgt_len=self.cfg.data.seq_len,
                               batch_size=per_process, seed=self.cfg.train.seed)

    def eval_batches(self, tok: Tokenizer, source) -> Iterator[Batch]:
        def build() -> list[Batch]:
            d, per_process = self.cfg.data, self.cfg.train.batch_size // jax.process_count()
            return seq2seq_eval_batches(self._examples(tok, source), src_len=d.source_len, tgt_len=d.seq_len,
                                        batch_size=per_process, shard_index=jax.process_index(),
                                        shard_count=jax.process_count(), max_batches=d.eval_batches)
        return with_target_bytes(self._cached_eval_batches(source, build), self.byte_lengths(tok))

    def objective(self) -> objectives.Objective:
        """Cross-entropy of the target given the source, teacher-forced."""
        return objectives.seq2seq(self.cfg.optim.z_loss, self.cfg.optim.label_smoothing)

TASKS = {"lm": LMTask, "mlm": MLMTask, "seq2seq": Seq2SeqTask}
_KIND_TASK = {"decoder": "lm", "encoder": "mlm", "encoder_decoder": "seq2seq"}


def task_for(cfg: Config) -> LMTask:
    """The pretraining task of ``cfg.model.kind`` (validated against ``cfg.data.source``)."""
    if cfg.model.n_classes:
        raise UserError(f"model.n_classes={cfg.model.n_classes}: classifiers are fine-tuned from an encoder run: "
                        "qkv finetune finetune.method=classify finetune.init_from=RUN ...")
    return TASKS[_KIND_TASK[cfg.model.kind]](cfg)
