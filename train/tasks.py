"""What a model family learns from, in one registry: its data, batch preparation and end-of-run report.

``task_for(cfg)`` names the task of a run from ``model.kind`` — the only place training branches on it:

  lm        decoder: next-token prediction on packed text (stdlib, files, jsonl, tfds)
  mlm       encoder: masked-language modelling on the same packed text (train/mlm.py, on the device)
  seq2seq   encoder_decoder: target given source, teacher-forced (toy, pairs, tfds translation)

(Encoder classification is a fine-tuning method: ``qkv finetune finetune.method=classify``.)
Each task gives the loop the same things: ``open(split)`` a random-access source, ``texts(source)``
to train the tokenizer on, ``train_iter`` (checkpointable: ``get_state``/``set_state``),
``eval_batches`` (the same number on every process), ``prepare`` (a pure function applied to each
batch inside the compiled steps, or None) and ``report`` (a sample, or BLEU, at the end of a run).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Iterator

import jax
import numpy as np

from qkv.data import (Seq2SeqIterator, Tokenizer, load_pairs, make_eval_dataset, make_lm_dataset, open_text_source,
                      PairTexts, seq2seq_eval_batches, tfds_pairs, tokenize_pairs, toy_pairs)
from qkv.data.tokenizer import MASK_ID

from .config import Config
from .mlm import mlm_corrupt

Batch = dict[str, np.ndarray]
TEXT_SOURCES = ("stdlib", "files", "jsonl", "tfds")
PAIR_SOURCES = ("toy", "pairs", "tfds")


def pad_to_same_count(batches: list[Batch], shard_counts: Sequence[int], template: Batch | None) -> list[Batch]:
    """This process's batches padded with empty ones (loss_mask 0) to the largest shard's count, so every
    process runs the same number of compiled evaluation steps."""
    if template is None:
        return batches
    empty = {k: np.zeros_like(v) for k, v in template.items()}
    return batches + [empty] * (max(shard_counts) - len(batches))


class LMTask:
    """Decoder-only language modelling: predict each next token of packed documents."""

    name, sources, with_mask = "lm", TEXT_SOURCES, False

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self._eval_cache: tuple[Any, list[Batch]] | None = None  # (source, its batches): built once per run
        if cfg.data.source not in self.sources:
            raise ValueError(f"data.source={cfg.data.source} cannot train model.kind={cfg.model.kind}: "
                             f"use data.source={'|'.join(self.sources)}")

    def open(self, split: str):
        d = self.cfg.data
        return open_text_source(d.source, d.path, split, Path(d.data_dir).expanduser(), text_field=d.text_field,
                                tfds_name=d.tfds_name, validation_fraction=d.validation_fraction,
                                train_split=d.train_split, eval_split=d.eval_split)

    def texts(self, source) -> Sequence[str]:
        return source

    def train_iter(self, tok: Tokenizer, source):
        per_process = self.cfg.train.batch_size // jax.process_count()
        return iter(make_lm_dataset(source, tok.encode, seq_len=self.cfg.data.seq_len, batch_size=per_process,
                                    seed=self.cfg.train.seed, shard_index=jax.process_index(),
                                    shard_count=jax.process_count(), bos_id=tok.bos_id, eos_id=tok.eos_id))

    def eval_batches(self, tok: Tokenizer, source) -> Iterator[Batch]:
        """A fixed number of validation batches per process (``data.eval_batches``; 0: the whole split,
        streamed), built once per run and reused at every evaluation."""
        if not self.cfg.data.eval_batches:
            return self._stream_eval_batches(tok, source)
        return self._cached_eval_batches(source, lambda: list(self._stream_eval_batches(tok, source)))

    def _cached_eval_batches(self, source, build) -> Iterator[Batch]:
        if self._eval_cache is None or self._eval_cache[0] is not source:
            self._eval_cache = (source, build())
        return iter(self._eval_cache[1])

    def _stream_eval_batches(self, tok: Tokenizer, source) -> Iterator[Batch]:
        """Padding with empty batches when a shard ends early, so every process runs the same number of
        compiled steps."""
        cfg = self.cfg
        per_process = cfg.train.batch_size // jax.process_count()
        ds = make_eval_dataset(source, tok.encode, seq_len=cfg.data.seq_len, batch_size=per_process,
                               bos_id=tok.bos_id, eos_id=tok.eos_id, shard_index=jax.process_index(),
                               shard_count=jax.process_count())
        it = iter(ds)
        first = next(it)
        yield first
        empty = {k: np.zeros_like(v) for k, v in first.items()}
        count, limit = 1, cfg.data.eval_batches or math.inf
        while count < limit:
            batch = next(it, None)
            if batch is None and not cfg.data.eval_batches:
                return
            yield empty if batch is None else batch
            count += 1

    def prepare(self):
        return None

    def check_tokenizer(self, tok: Tokenizer) -> None:
        if tok.vocab_size > self.cfg.model.vocab_size:
            raise ValueError(f"the tokenizer has {tok.vocab_size} pieces but model.vocab_size={self.cfg.model.vocab_size}: "
                             f"set model.vocab_size={tok.vocab_size} or use a smaller tokenizer")

    def report(self, trainer, params, tok: Tokenizer, source) -> dict[str, Any]:
        """The end-of-run report: a sampled continuation of train.sample_prompt (logged too)."""
        t = self.cfg.train
        if t.sample_tokens <= 0:
            return {}
        from .loop import log, sample_text
        sample = sample_text(trainer, params, tok, t.sample_prompt, t.sample_tokens)
        log("sample:\n" + sample)
        return {"sample": sample}

    def split_scores(self, trainer, params, tok: Tokenizer, source, beam_size: int = 1) -> dict[str, Any]:
        """What ``qkv evaluate`` adds to the loss and accuracy of a split: nothing for this task."""
        return {}


class MLMTask(LMTask):
    """Encoder-only masked-language modelling (BERT): recover 15 % of the tokens from both sides."""

    name, with_mask = "mlm", True

    def prepare(self):
        return functools.partial(mlm_corrupt, mask_id=MASK_ID, vocab_size=self.cfg.model.vocab_size)

    def check_tokenizer(self, tok: Tokenizer) -> None:
        super().check_tokenizer(tok)
        if tok.mask_id is None:
            raise ValueError("the tokenizer has no <mask> piece for masked-language modelling: leave tokenizer.path "
                             "unset so qkv trains one with it (qkv.data.train_tokenizer(..., with_mask=True))")

    def report(self, trainer, params, tok, source) -> dict[str, Any]:
        return {}


class Seq2SeqTask(LMTask):
    """Encoder-decoder: the target given the source, with teacher forcing (and optional label smoothing)."""

    name, sources = "seq2seq", PAIR_SOURCES

    def open(self, split: str):
        d = self.cfg.data
        if d.source == "toy":
            return toy_pairs(split, d.toy_limit)
        if d.source == "tfds":
            if not d.tfds_name:
                raise ValueError("data.source=tfds needs data.tfds_name=NAME (e.g. wmt14_translate/de-en)")
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
            from .loop import log
            log(f"left out {out.skipped} pairs longer than data.source_seq_len/seq_len and {out.empty} with an empty side")
        return out.items

    def train_iter(self, tok: Tokenizer, source):
        per_process = self.cfg.train.batch_size // jax.process_count()
        examples = self._examples(tok, source)[jax.process_index()::jax.process_count()]
        if not examples:
            raise ValueError(f"the training pairs are fewer than the {jax.process_count()} processes")
        return Seq2SeqIterator(examples, src_len=self.cfg.data.source_len, tgt_len=self.cfg.data.seq_len,
                               batch_size=per_process, seed=self.cfg.train.seed)

    def eval_batches(self, tok: Tokenizer, source) -> Iterator[Batch]:
        def build() -> list[Batch]:
            d, per_process = self.cfg.data, self.cfg.train.batch_size // jax.process_count()
            examples = self._examples(tok, source)
            shards = [seq2seq_eval_batches(examples, src_len=d.source_len, tgt_len=d.seq_len, batch_size=per_process,
                                           shard_index=i, shard_count=jax.process_count(), max_batches=d.eval_batches)
                      for i in range(jax.process_count())]
            template = next((s[0] for s in shards if s), None)
            return pad_to_same_count(shards[jax.process_index()], [len(s) for s in shards], template)
        return self._cached_eval_batches(source, build)

    def report(self, trainer, params, tok: Tokenizer, source, limit: int = 200) -> dict[str, Any]:
        """Greedy translations of the first ``limit`` validation pairs: corpus BLEU and three samples
        (none with train.sample_tokens=0)."""
        if self.cfg.train.sample_tokens <= 0:
            return {}
        from qkv.inference.translate import translate_and_score
        pairs = [source[i] for i in range(min(limit, len(source)))]  # TFDS sources index, they do not slice
        result = translate_and_score(trainer.model_cfg, trainer.graphdef, params, tok, pairs,
                                     max_new_tokens=self.cfg.data.seq_len)
        samples = result.pop("samples")[:3]
        sample = "\n".join(f"{s} -> {h}" for s, h, _ in samples)
        from .loop import log
        log(f"validation BLEU {result['bleu']:.1f} on {result['pairs']} pairs (greedy)")
        log("sample:\n" + sample)
        return {**result, "sample": sample}

    def split_scores(self, trainer, params, tok: Tokenizer, source, beam_size: int = 1) -> dict[str, Any]:
        """Corpus BLEU, exact-match rate and BLEU's parts of greedy (or beam) translations of the whole split."""
        from qkv.inference.translate import translate_and_score
        scored = translate_and_score(trainer.model_cfg, trainer.graphdef, params, tok, list(source),
                                     max_new_tokens=self.cfg.data.seq_len, beam_size=beam_size)
        return {"bleu": scored["bleu"], "bleu_pairs": scored["pairs"], "exact_match": scored["exact_match"],
                "bleu_detail": scored["bleu_detail"]}


TASKS = {"lm": LMTask, "mlm": MLMTask, "seq2seq": Seq2SeqTask}
_KIND_TASK = {"decoder": "lm", "encoder": "mlm", "encoder_decoder": "seq2seq"}


def task_for(cfg: Config) -> LMTask:
    """The pretraining task of ``cfg.model.kind`` (validated against ``cfg.data.source``)."""
    if cfg.model.n_classes:
        raise ValueError(f"model.n_classes={cfg.model.n_classes}: classifiers are fine-tuned from an encoder run: "
                         "qkv finetune finetune.method=classify finetune.init_from=RUN ...")
    return TASKS[_KIND_TASK[cfg.model.kind]](cfg)
