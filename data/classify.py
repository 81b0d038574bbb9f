"""Text classification data for encoder (BERT-style) models: labeled texts, class indices, batches.

Sources (each gives a list of :class:`LabeledText`: text, raw label, ``where`` for messages):

  ``read_labeled(path)``        JSONL records ``{"text": "...", "label": ...}`` (field names
                                configurable; blank lines ignored; a glob reads several files); a
                                label is an int or a non-empty string
  ``tfds_labeled(name, ...)``   a TFDS catalog dataset such as ``glue/sst2`` (features "sentence"
                                and a ClassLabel "label") prepared as array_record; returns the
                                records and the ClassLabel's names. Unlabeled splits (label -1, as in
                                GLUE's test splits) are refused.

The label set is a list: class index i is ``labels[i]``. Give it explicitly (e.g. the names from
``tfds_labeled``, or a config list) or let :func:`infer_labels` take the sorted distinct labels of
the training records (ints stay ints). Labels compare with their type: 1 and "1" differ. A record
whose label is not in the set is a :class:`DataError` naming ``file:line``, the label and the set.

Token layout of one example: ``[bos] + encode(text) + [eos]`` (eos optional). A longer one is
truncated to ``seq_len`` tokens, keeping the eos last, as usual for BERT-style classification; the
number truncated is ``ClassifySet.truncated``. Empty (whitespace-only) texts are an error.

Batch contract (int32 numpy arrays; see :data:`CLASSIFY_BATCH_KEYS`), one example per row:

  inputs, segment_ids, positions   [batch, seq_len]   segment 1 on the text, 0 on padding
  targets                          [batch, 1]         class index
  loss_mask                        [batch, 1]         1 on real rows, 0 on padding rows

The iterators are those of :mod:`qkv.data.examples` (seeded, endless, JSON state
``{"epoch", "next", "examples"}``); the eval pass pads its last batch with empty rows.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .examples import DataError, PackingIterator, rows_to_batch, field_text, read_jsonl, shard
from .sources import TextSource, open_catalog, record_text
from qkv.errors import UserError

CLASSIFY_BATCH_KEYS = ("inputs", "segment_ids", "positions", "targets", "loss_mask")
Label = int | str


@dataclass(frozen=True)
class LabeledText:
    """One text with its raw label (an int or a str) and where it came from (``file:line``, ...)."""

    text: str
    label: Label
    where: str


@dataclass(frozen=True)
class ClassExample:
    """One tokenized text (``inputs``, int32, <= seq_len) and its class index ``label``."""

    inputs: np.ndarray
    label: int
    where: str

    def __len__(self) -> int:
        return len(self.inputs)


@dataclass
class ClassifySet:
    """Tokenized examples, the label set (class index -> label) and how many texts were truncated."""

    items: list[ClassExample]
    labels: list[Label]
    truncated: int = 0

    def counts(self) -> dict[Label, int]:
        """How many examples each label has (every label of the set, 0 included)."""
        found = Counter(ex.label for ex in self.items)
        return {label: found[i] for i, label in enumerate(self.labels)}


def _label(value: Any, where: str, field: str) -> Label:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise DataError(f"{where}: field {field!r} must be an int or a string, got {type(value).__name__}")
    if isinstance(value, str) and not value.strip():
        raise DataError(f"{where}: field {field!r} is empty: every example needs a label")
    return value


def read_labeled(pattern: str, *, text_field: str = "text", label_field: str = "label") -> list[LabeledText]:
    """Every (text, label) record of the matching JSONL files, in file order."""
    fix = "pass a .jsonl file (or glob) of {text, label} records"
    out = []
    for where, record in read_jsonl(pattern, fix):
        text = field_text(record, text_field, where, True)
        if label_field not in record:
            raise DataError(f"{where}: missing field {label_field!r} (has {', '.join(map(repr, record))})")
        out.append(LabeledText(text, _label(record[label_field], where, label_field), where))
    if not out:
        raise DataError(f"{pattern}: no records found: the file has only blank lines")
    return out


class _LabeledSource(TextSource):
    """A TFDS split whose items are LabeledText with the raw (int) label."""

    def __init__(self, inner: Any, text_field: str, label_field: str, description: str):
        super().__init__(inner, text_field, description)
        self._label_field = label_field

    def _item(self, record: Any, index: int) -> LabeledText:
        return LabeledText(record_text(record, self._text_field), int(record[self._label_field]),
                           f"{self._description}[{index}]")


def tfds_labeled(name: str, split: str, data_dir: str | Path, *, text_field: str = "sentence",
                 label_field: str = "label") -> tuple[list[LabeledText], list[str] | None]:
    """(records, label names) of a prepared TFDS catalog classification split, e.g. glue/sst2.

    The names are the ClassLabel's (class index i is names[i]; records then carry the names as
    labels), or None when the label feature is a plain integer. A label of -1 marks an unlabeled
    example (GLUE test splits): a DataError, since such a split cannot be trained or evaluated on.
    """
    builder, inner = open_catalog(name, split, Path(data_dir).expanduser(), [text_field, label_field],
                                  "set the text and label field names")
    feature = builder.info.features[label_field]
    names = list(feature.names) if getattr(feature, "names", None) else None  # a ClassLabel's names
    records = list(_LabeledSource(inner, text_field, label_field, f"tfds:{name}:{split}"))
    unlabeled = [r for r in records if r.label == -1]
    if unlabeled:
        raise DataError(f"{unlabeled[0].where}: label -1: {len(unlabeled)} of {len(records)} examples of split "
                        f"{split!r} are unlabeled (GLUE hides its test labels): train and evaluate on labeled "
                        f"splits (e.g. 'validation'), or predict without labels")
    if names is not None:
        records = [LabeledText(r.text, names[r.label], r.where) for r in records]
    return records, names


def infer_labels(records: Sequence[LabeledText]) -> list[Label]:
    """The sorted distinct labels of ``records`` (ints stay ints); at least two, all of one type."""
    values = {r.label for r in records}
    kinds = {type(v) for v in values}
    if len(kinds) > 1:
        ints = sorted(v for v in values if isinstance(v, int))
        strs = sorted(v for v in values if isinstance(v, str))
        raise DataError(f"labels mix ints {ints[:5]} and strings {strs[:5]}: make them all one type, or give the "
                        "label set explicitly")
    if len(values) < 2:
        raise DataError(f"the training data has only the label(s) {sorted(values)}: a classifier needs at least "
                        "two classes; give the label set explicitly or use more data")
    return sorted(values)


def classify_examples(records: Sequence[LabeledText], encode: Callable[[str], list[int]], *, bos_id: int,
                      eos_id: int, seq_len: int, labels: Sequence[Label] | None = None,
                      add_eos: bool = True) -> ClassifySet:
    """Tokenized examples with class indices (``labels`` given, or inferred from ``records``).

    Texts longer than ``seq_len`` tokens are truncated (eos kept last) and counted in ``truncated``.
    """
    labels = list(labels) if labels is not None else infer_labels(records)
    index = {label: i for i, label in enumerate(labels)}
    if len(index) != len(labels):
        raise UserError(f"the label set {labels} has duplicates: name each label once")
    if seq_len < 2:
        raise UserError(f"seq_len={seq_len}: classification needs at least 2 tokens (bos and text)")
    out = ClassifySet([], labels)
    for r in records:
        if not r.text.strip():
            raise DataError(f"{r.where}: empty text: every example needs a non-empty text")
        if r.label not in index:
            same_text = [lab for lab in labels if str(lab) == str(r.label)]
            note = f" ({same_text[0]!r} is, but labels compare with their type)" if same_text else ""
            raise DataError(f"{r.where}: label {r.label!r} is not in the label set {labels}{note}: fix the "
                            "record or add the label to the label set")
        tokens = [bos_id, *encode(r.text)] + ([eos_id] if add_eos else [])
        if len(tokens) > seq_len:
            out.truncated += 1
            tokens = tokens[:seq_len - 1] + [eos_id] if add_eos else tokens[:seq_len]
        out.items.append(ClassExample(np.asarray(tokens, np.int32), index[r.label], r.where))
    if not out.items:
        raise DataError("no examples to classify: the records are empty")
    return out


class ClassifyIterator(PackingIterator):
    """Endless classification batches (module docstring), one example per row, in a seeded order per
    epoch; ``get_state``/``set_state`` round-trip through JSON."""

    def __init__(self, examples: Sequence[ClassExample], *, seq_len: int, batch_size: int, seed: int,
                 shuffle: bool = True):
        super().__init__(examples, limits=(1,), batch_size=batch_size, seed=seed, shuffle=shuffle)
        self.seq_len = seq_len

    def _sizes(self, item: ClassExample) -> tuple[int]:
        return (1,)  # limits=(1,): every example opens its own row

    def _batch(self, rows: list[list[ClassExample]]) -> dict[str, np.ndarray]:
        batch = rows_to_batch(rows, self.seq_len, self.batch_size, {"inputs": "inputs"})
        batch["targets"] = np.zeros((self.batch_size, 1), np.int32)
        batch["loss_mask"] = np.zeros((self.batch_size, 1), np.int32)
        for r, row in enumerate(rows):
            for ex in row:
                batch["targets"][r, 0], batch["loss_mask"][r, 0] = ex.label, 1
        return batch


def classify_eval_batches(examples: Sequence[ClassExample], *, seq_len: int, batch_size: int,
                          shard_index: int = 0, shard_count: int = 1,
                          max_batches: int = 0) -> list[dict[str, np.ndarray]]:
    """One ordered pass over ``examples[shard_index::shard_count]`` (at most ``max_batches``, 0 = all),
    the last batch padded with empty rows (loss_mask 0); [] for an empty shard."""
    return ClassifyIterator(shard(examples, shard_index, shard_count), seq_len=seq_len, batch_size=batch_size,
                            seed=0, shuffle=False).one_pass(max_batches)
