"""Parallel (source, target) text for encoder-decoder models: sources, tokenization, packed batches.

Sources (each gives a Sequence of :class:`Pair`, a ``(source, target)`` tuple that also carries
``where`` it came from, used in error messages):

  ``toy_pairs(split)``      numbers to English words, "4721" -> "four thousand seven hundred
                            twenty-one"; built in, deterministic, no download (see below)
  ``load_pairs(path, ...)`` a TSV file (``source<TAB>target`` per line), a JSONL file
                            (``{"source": ..., "target": ...}``, field names configurable) or two
                            line-aligned text files (``path="train.de", target_path="train.en"``)
  ``tfds_pairs(name, ...)`` a TFDS catalog translation dataset (``wmt14_translate/de-en``: features
                            ``{"de": text, "en": text}``) prepared as array_record; lazy random access

Toy task: the numbers 0 .. ``limit - 1`` (default 10,000), each assigned to a split by a fixed hash
of the number (crc32 of its digits, mod 100: 0-89 train, 90-94 validation, 95-99 test), so about
9,000 train, 500 validation and 500 test numbers; the test numbers are never seen in training and a
number's split does not depend on ``limit``. Sources are the digits ("4721"); targets use "-"
between tens and units ("twenty-one") and no "and" ("one hundred five").

Token layout of one example (``encode`` gives ids without specials):

  source ids      encode(source) + [eos]
  decoder inputs  [bos] + encode(target)
  targets         encode(target) + [eos]          (loss on every target token)

Batch contract (int32 numpy arrays; see :data:`SEQ2SEQ_BATCH_KEYS`):

  src_inputs, src_segment_ids, src_positions          [batch, src_len]
  inputs, targets, segment_ids, positions, loss_mask  [batch, tgt_len]

Several whole examples share a row (never split): a row is closed when the next example's source
does not fit in ``src_len`` or its target in ``tgt_len``. Example k of a row is segment k on both
sides, so cross-attention is masked by ``src_segment_ids == segment_ids``; positions restart at 0
per example; 0 is padding everywhere. An example with more than ``src_len`` source tokens or
``tgt_len`` target tokens is a :class:`DataError` naming it unless ``overlong="skip"`` (then it is
left out and counted in ``ExampleSet.skipped``). The iterators are those of :mod:`qkv.data.examples`: a
seeded, endless, resumable order whose JSON state is ``{"epoch", "next", "examples"}``.
"""
from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .examples import DataError, ExampleSet, PackingIterator, rows_to_batch, field_text, read_jsonl, read_lines, shard
from .sources import TextSource, open_catalog, record_text
from qkv.errors import UserError

SEQ2SEQ_BATCH_KEYS = ("src_inputs", "src_segment_ids", "src_positions",
                      "inputs", "targets", "segment_ids", "positions", "loss_mask")
TOY_SPLITS = ("train", "validation", "test")
PAIR_KINDS = ("tsv", "jsonl", "parallel")


class Pair(tuple):
    """A ``(source, target)`` text pair; ``where`` names its origin (``file:line``, ...)."""

    where: str

    def __new__(cls, source: str, target: str, where: str = "") -> Pair:
        pair = super().__new__(cls, (source, target))
        pair.where = where
        return pair

    def __getnewargs__(self) -> tuple[str, str, str]:
        return self[0], self[1], self.where

    @property
    def source(self) -> str:
        return self[0]

    @property
    def target(self) -> str:
        return self[1]

    def __repr__(self) -> str:
        return f"Pair({self[0]!r}, {self[1]!r}, where={self.where!r})"


# ------------------------------------------------------------------------------------------ toy task

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")


def number_to_words(n: int) -> str:
    """English words for 0 <= n < 1,000,000: 90 -> "ninety", 4721 -> "four thousand seven hundred twenty-one"."""
    if not 0 <= n < 1_000_000:
        raise ValueError(f"number_to_words covers 0 .. 999999, not {n}")  # its callers keep to the range
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + (f"-{_ONES[n % 10]}" if n % 10 else "")
    big, unit = (n // 100, " hundred") if n < 1000 else (n // 1000, " thousand")
    rest = n % 100 if n < 1000 else n % 1000
    return number_to_words(big) + unit + (f" {number_to_words(rest)}" if rest else "")


def toy_split(n: int) -> str:
    """The toy task's split of number n: a fixed hash, about 90% train, 5% validation, 5% test."""
    bucket = zlib.crc32(str(n).encode()) % 100
    return "train" if bucket < 90 else "validation" if bucket < 95 else "test"


def toy_pairs(split: str, limit: int = 10_000) -> list[Pair]:
    """The toy task's (digits, words) pairs of ``split`` among the numbers 0 .. limit-1, ascending."""
    if split not in TOY_SPLITS:
        raise UserError(f"split {split!r} does not exist: use one of {TOY_SPLITS}")
    if not 20 <= limit <= 1_000_000:
        raise UserError(f"toy limit={limit}: use 20 .. 1000000 numbers")
    return [Pair(str(n), number_to_words(n), f"toy:{split}:{n}") for n in range(limit) if toy_split(n) == split]


# ----------------------------------------------------------------------------------------- local files

def _empty_side(source: str, target: str) -> str | None:
    return "source" if not source.strip() else "target" if not target.strip() else None


def _for_split(path: str, split: str | None) -> str:
    if "{split}" not in path:
        return path
    if split is None:
        raise UserError(f"path {path!r} has a {{split}} placeholder but no split was given")
    return path.replace("{split}", split)


def _text_lines(path: str, role: str) -> list[str]:
    """The lines of a text file without line ends, trailing blank lines dropped."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{role} file {path!r} does not exist: pass the path of a text file "
                                "with one sentence per line")
    with open(file, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def _parallel_pairs(source_path: str, target_path: str) -> list[Pair]:
    sources, targets = _text_lines(source_path, "source"), _text_lines(target_path, "target")
    if len(sources) != len(targets):
        raise DataError(f"{source_path} has {len(sources)} lines but {target_path} has {len(targets)} (trailing "
                        "blank lines not counted): the two files must be line-aligned, one target line per "
                        f"source line; the first unmatched line is {min(len(sources), len(targets)) + 1}")
    pairs = []
    for i, (src, tgt) in enumerate(zip(sources, targets), 1):
        side = _empty_side(src, tgt)
        if side:
            path = source_path if side == "source" else target_path
            raise DataError(f"{path}:{i}: empty {side} line: every pair needs a non-empty source and target; "
                            "remove the line from both files or fill it in")
        pairs.append(Pair(src, tgt, f"{source_path}:{i}"))
    return pairs


def _tsv_pairs(pattern: str) -> list[Pair]:
    pairs = []
    for where, line in read_lines(pattern, "TSV file", "pass a .tsv file (or glob) with source<TAB>target lines"):
        parts = line.rstrip("\r\n").split("\t")
        if len(parts) != 2:
            raise DataError(f"{where}: expected source<TAB>target (exactly one tab), found {len(parts) - 1} tabs: "
                            "remove tabs inside the texts, or use JSONL for such data")
        side = _empty_side(*parts)
        if side:
            raise DataError(f"{where}: empty {side}: every pair needs a non-empty source and target")
        pairs.append(Pair(parts[0], parts[1], where))
    return pairs


def _jsonl_pairs(pattern: str, source_field: str, target_field: str) -> list[Pair]:
    fix = "pass a .jsonl file (or glob) of {source, target} records"
    return [Pair(field_text(record, source_field, where, True), field_text(record, target_field, where, True), where)
            for where, record in read_jsonl(pattern, fix)]


def load_pairs(path: str, split: str | None = None, *, target_path: str | None = None, kind: str | None = None,
               source_field: str = "source", target_field: str = "target") -> list[Pair]:
    """Every (source, target) pair of local files, validated, in file order.

    ``kind`` is "tsv", "jsonl" or "parallel" (two line-aligned files: ``path`` holds the sources,
    ``target_path`` the targets); by default it follows ``target_path`` and the suffix (.tsv/.tab,
    .jsonl/.json). A ``{split}`` in ``path`` or ``target_path`` is replaced by ``split`` (so one
    setting such as ``"data/{split}.tsv"`` serves train and validation); ``split`` is otherwise
    unused. TSV and JSONL skip blank lines and may be globs; parallel files ignore trailing blank
    lines only (an empty line inside breaks the alignment and is an error).
    """
    path = _for_split(str(path), split)
    target_path = _for_split(str(target_path), split) if target_path else None
    if kind is None:
        suffix = Path(path).suffix.lower()
        kind = ("parallel" if target_path else "jsonl" if suffix in (".jsonl", ".json")
                else "tsv" if suffix in (".tsv", ".tab") else "")
        if not kind:
            raise DataError(f"{path}: cannot tell the format of {Path(path).name!r}: name it .tsv or .jsonl, pass "
                            f"kind= one of {PAIR_KINDS}, or give target_path for two line-aligned text files")
    if kind not in PAIR_KINDS:
        raise UserError(f"pair file kind {kind!r} is not supported: use one of {PAIR_KINDS}")
    if kind == "parallel":
        if not target_path:
            raise UserError("kind 'parallel' needs target_path: the file of target lines aligned with path")
        pairs = _parallel_pairs(path, target_path)
    elif kind == "tsv":
        pairs = _tsv_pairs(path)
    else:
        pairs = _jsonl_pairs(path, source_field, target_field)
    if not pairs:
        raise DataError(f"{path}: no pairs found: the file has only blank lines")
    return pairs


# ------------------------------------------------------------------------------------------------ TFDS

class TfdsPairs(TextSource):
    """Lazy random access to a TFDS translation split: item i is a :class:`Pair` (where ``name:split[i]``)."""

    def __init__(self, inner: Any, source_lang: str, target_lang: str, description: str):
        super().__init__(inner, source_lang, description)
        self._target_lang = target_lang

    def _item(self, record: Any, index: int) -> Pair:
        return Pair(record_text(record, self._text_field), record_text(record, self._target_lang),
                    f"{self._description}[{index}]")

    def __repr__(self) -> str:
        return f"TfdsPairs({self._description}, {len(self)} pairs)"


def tfds_pairs(name: str, split: str, data_dir: str | Path, source_lang: str, target_lang: str,
               train_split: str = "train", eval_split: str = "") -> TfdsPairs:
    """The (source_lang, target_lang) text pairs of a prepared TFDS catalog translation dataset's split
    (a role or split expression: see `qkv.data.sources.resolve_split`)."""
    if source_lang == target_lang:
        raise UserError(f"source_lang and target_lang are both {source_lang!r}: name two languages")
    _, inner = open_catalog(name, split, Path(data_dir).expanduser(), [source_lang, target_lang],
                            "set source_lang and target_lang to two of its languages", train_split, eval_split)
    return TfdsPairs(inner, source_lang, target_lang, f"tfds:{name}:{split}")


class PairTexts(Sequence):
    """Both sides' texts of ``pairs`` (source, then target, pair by pair) as one random-access sequence
    (text 2i is pair i's source, 2i+1 its target): input for a joint SentencePiece vocabulary."""

    def __init__(self, pairs: Sequence[tuple[str, str]]):
        self.pairs = pairs

    def __len__(self) -> int:
        return 2 * len(self.pairs)

    def __getitem__(self, i):
        return self.pairs[int(i) // 2][int(i) % 2]

    def __getitems__(self, indices):
        return [self[i] for i in indices]

    def __iter__(self) -> Iterator[str]:
        for source, target in self.pairs:
            yield source
            yield target


# ------------------------------------------------------------------------------------ tokens, batches

@dataclass(frozen=True)
class Seq2SeqExample:
    """One tokenized pair: ``source`` = encode(src)+[eos]; ``inputs`` = [bos]+encode(tgt);
    ``targets`` = encode(tgt)+[eos] (int32 arrays)."""

    source: np.ndarray
    inputs: np.ndarray
    targets: np.ndarray
    where: str

    @property
    def loss_mask(self) -> np.ndarray:
        return np.ones(len(self.targets), np.int32)


def _check_choice(name: str, value: str) -> None:
    if value not in ("error", "skip"):
        raise UserError(f"{name}={value!r}: use 'error' or 'skip'")


def tokenize_pairs(pairs: Iterable[tuple[str, str]], encode: Callable[[str], list[int]], *, bos_id: int,
                   eos_id: int, src_len: int, tgt_len: int, overlong: str = "error",
                   empty: str = "error") -> ExampleSet:
    """Every pair as a :class:`Seq2SeqExample`, in order (an ExampleSet: ``items``, ``skipped``, ``empty``).

    A pair with more than ``src_len`` source tokens (eos included) or ``tgt_len`` target tokens
    (bos/eos included once) is a DataError unless ``overlong="skip"``: then it is counted in
    ``skipped``. A pair with an empty side (possible in TFDS data; local loaders refuse them) is a
    DataError unless ``empty="skip"``: then it is counted in ``empty``.
    """
    _check_choice("overlong", overlong)
    _check_choice("empty", empty)
    out = ExampleSet([])
    for i, pair in enumerate(pairs):
        source, target = pair
        where = getattr(pair, "where", "") or f"pair {i}"
        side = _empty_side(source, target)
        if side:
            if empty == "skip":
                out.empty += 1
                continue
            raise DataError(f"{where}: empty {side}: every pair needs a non-empty source and target; fix the data "
                            "or set empty='skip' to leave such pairs out")
        src_ids = np.asarray([*encode(source), eos_id], np.int32)
        tgt_ids = encode(target)
        example = Seq2SeqExample(src_ids, np.asarray([bos_id, *tgt_ids], np.int32),
                                 np.asarray([*tgt_ids, eos_id], np.int32), where)
        if len(example.source) <= src_len and len(example.targets) <= tgt_len:
            out.items.append(example)
        elif overlong == "skip":
            out.skipped += 1
        else:
            raise DataError(f"{where}: the pair has {len(example.source)} source tokens (with eos) and "
                            f"{len(example.targets)} target tokens (with eos), more than src_len={src_len} or "
                            f"tgt_len={tgt_len}: shorten it, raise the lengths, or set overlong='skip' to leave "
                            "such pairs out")
    if not out.items:
        raise DataError(f"no usable pairs ({out.skipped} overlong and {out.empty} with an empty side were skipped)")
    return out


class Seq2SeqIterator(PackingIterator):
    """Endless seq2seq batches (module docstring): whole examples packed first-come into rows, in a
    seeded order per epoch; ``get_state``/``set_state`` round-trip through JSON."""

    def __init__(self, examples: Sequence[Seq2SeqExample], *, src_len: int, tgt_len: int, batch_size: int,
                 seed: int, shuffle: bool = True):
        super().__init__(examples, limits=(src_len, tgt_len), batch_size=batch_size, seed=seed, shuffle=shuffle)
        self.src_len, self.tgt_len = src_len, tgt_len

    def _sizes(self, item: Seq2SeqExample) -> tuple[int, int]:
        return len(item.source), len(item.targets)

    def _batch(self, rows: list[list[Seq2SeqExample]]) -> dict[str, np.ndarray]:
        source = rows_to_batch(rows, self.src_len, self.batch_size, {"src_inputs": "source"}, prefix="src_")
        return {**source, **rows_to_batch(rows, self.tgt_len, self.batch_size)}


def seq2seq_eval_batches(examples: Sequence[Seq2SeqExample], *, src_len: int, tgt_len: int, batch_size: int,
                         shard_index: int = 0, shard_count: int = 1,
                         max_batches: int = 0) -> list[dict[str, np.ndarray]]:
    """One ordered pass over ``examples[shard_index::shard_count]`` (at most ``max_batches``, 0 = all),
    packed as in training, the last batch padded with empty rows; [] for an empty shard."""
    return Seq2SeqIterator(shard(examples, shard_index, shard_count), src_len=src_len, tgt_len=tgt_len,
                           batch_size=batch_size, seed=0, shuffle=False).one_pass(max_batches)
