"""Examples from JSONL, packed into rows: the library shared by SFT/DPO (sft.py), classification
(classify.py) and seq2seq pairs (seq2seq.py).

``read_jsonl`` yields (``file:line``, record) and stops on bad JSON with a :class:`DataError` naming
``file:line``; ``field_text`` reads one string field of a record the same way. ``rows_to_batch`` lays
rows of whole examples out in the batch contract (each example its own segment, positions from 0,
padding 0). ``OrderedIterator`` walks items in a seeded order per epoch with a JSON-able position;
``PackingIterator`` packs whole items first-come into rows (an item is never split) and makes one
ordered pass for evaluation; ``shard`` takes a process's share of an evaluation set.
"""
from __future__ import annotations

import glob
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from qkv.errors import UserError


class DataError(UserError):
    """A fine-tuning record that cannot be used, named by file:line."""


@dataclass(frozen=True)
class Example:
    """One token sequence: inputs/targets/loss_mask int32 arrays of equal length (<= seq_len)."""

    inputs: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    where: str  # file:line

    def __len__(self) -> int:
        return len(self.inputs)


@dataclass
class ExampleSet:
    """Examples (SFT: Example; DPO: (chosen, rejected) pairs) and how many overlong ones were skipped."""

    items: list[Any]
    skipped: int = 0
    files: list[str] = field(default_factory=list)
    empty: int = 0  # seq2seq: pairs left out for an empty side (see seq2seq.tokenize_pairs)


_JSONL_FIX = "set finetune.train_path (or eval_path) to a .jsonl file or glob"


def jsonl_files(pattern: str, what: str = "JSONL file", fix: str = _JSONL_FIX) -> list[str]:
    """The files a path or glob names, sorted; FileNotFoundError saying ``fix`` when there are none."""
    path = Path(pattern).expanduser()
    files = sorted(glob.glob(str(path))) if any(c in pattern for c in "*?[") else ([str(path)] if path.is_file() else [])
    if not files:
        raise FileNotFoundError(f"no {what} matches {pattern!r}: {fix}")
    return files


def read_lines(pattern: str, what: str = "JSONL file", fix: str = _JSONL_FIX) -> Iterator[tuple[str, str]]:
    """(``file:line``, line) for every non-blank line of the matching files, in file order."""
    for name in jsonl_files(pattern, what, fix):
        with open(name, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield f"{name}:{lineno}", line


def read_jsonl(pattern: str, fix: str = _JSONL_FIX) -> Iterator[tuple[str, dict[str, Any]]]:
    """(``file:line``, record) for every non-blank line of the matching files, in file order."""
    for where, line in read_lines(pattern, "JSONL file", fix):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        yield where, record


def field_text(record: dict[str, Any], key: str, where: str, nonempty: bool) -> str:
    """The string field ``key`` of a JSONL record; a :class:`DataError` naming ``where`` otherwise."""
    if key not in record:
        raise DataError(f"{where}: missing field {key!r} (has {', '.join(map(repr, record)) or 'no fields'})")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    if nonempty and not value.strip():
        raise DataError(f"{where}: field {key!r} is empty: every example needs a non-empty {key}")
    return value


_LM_FIELDS = {"inputs": "inputs", "targets": "targets", "loss_mask": "loss_mask"}


def rows_to_batch(rows: Sequence[Sequence[Any]], seq_len: int, batch_size: int,
                   fields: dict[str, str] | None = None, prefix: str = "") -> dict[str, np.ndarray]:
    """Rows of whole examples -> the batch contract; examples are segments 1, 2, ...; padding is 0.

    ``fields`` maps batch keys to the example attributes laid out along the row (default: an
    :class:`Example`'s inputs, targets and loss_mask; the first attribute's length is the example's);
    the segment ids and positions go to ``prefix + "segment_ids"`` and ``prefix + "positions"``.
    """
    fields = fields or _LM_FIELDS
    seg, pos = prefix + "segment_ids", prefix + "positions"
    batch = {k: np.zeros((batch_size, seq_len), np.int32) for k in (*fields, seg, pos)}
    for r, row in enumerate(rows):
        start = 0
        for s, ex in enumerate(row, 1):
            values = [(key, getattr(ex, attr)) for key, attr in fields.items()]
            end = start + len(values[0][1])
            for key, value in values:
                batch[key][r, start:end] = value
            batch[seg][r, start:end] = s
            batch[pos][r, start:end] = np.arange(end - start)
            start = end
    return batch


class OrderedIterator:
    """Walks items in a seeded permutation per epoch (or file order when not shuffled), forever.

    State ``{"epoch", "next", "examples"}``: the epoch and index (in that epoch's order) of the next
    item not yet in any batch; ``examples`` guards against resuming with different data.
    """

    def __init__(self, items: Sequence[Any], seed: int, shuffle: bool):
        self.items, self.seed, self.shuffle = items, seed, shuffle
        self.epoch, self.next = 0, 0
        self._order_epoch, self._order = -1, None

    def _current(self) -> Any:
        if self._order_epoch != self.epoch:
            n = len(self.items)
            self._order = (np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle
                           else np.arange(n))
            self._order_epoch = self.epoch
        return self.items[int(self._order[self.next])]

    def _advance(self) -> None:
        self.next += 1
        if self.next == len(self.items):
            self.epoch, self.next = self.epoch + 1, 0

    def __iter__(self):
        return self

    def get_state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "next": self.next, "examples": len(self.items)}

    def set_state(self, state: dict[str, Any]) -> None:
        if int(state["examples"]) != len(self.items):
            raise UserError(f"the saved data position is for {state['examples']} examples, the data now has "
                            f"{len(self.items)}: resume with the same finetune.train_path or use a new run_dir")
        self.epoch, self.next = int(state["epoch"]), int(state["next"])


def shard(items: Sequence[Any], shard_index: int, shard_count: int) -> Sequence[Any]:
    """``items[shard_index::shard_count]``: this process's share of an evaluation set."""
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} is not in [0, shard_count={shard_count}): "
                         "pass the process index and process count")
    return items[shard_index::shard_count]


class PackingIterator(OrderedIterator):
    """Endless batches of ``batch_size`` rows, whole items packed first-come into rows.

    An item has a size in each of ``limits`` (``_sizes``); a row is closed when the next item does
    not fit in one of them, so no item is ever split. Subclasses turn rows into arrays (``_batch``).
    """

    def __init__(self, items: Sequence[Any], *, limits: tuple[int, ...], batch_size: int, seed: int,
                 shuffle: bool):
        super().__init__(items, seed, shuffle)
        self.limits, self.batch_size = tuple(limits), batch_size

    def _sizes(self, item: Any) -> tuple[int, ...]:
        return (len(item),)

    def _batch(self, rows: list[list[Any]]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _rows(self, one_pass: bool = False) -> list[list[Any]]:
        """The next batch's rows; with ``one_pass``, fewer when this epoch ends first."""
        if not len(self.items):
            raise RuntimeError("there are no examples to make batches of (the loaders refuse an empty set first)")
        rows: list[list[Any]] = [[]]
        used = (0,) * len(self.limits)
        epoch = self.epoch
        while not (one_pass and self.epoch != epoch):
            item = self._current()
            sizes = self._sizes(item)
            if any(u + n > limit for u, n, limit in zip(used, sizes, self.limits)):
                if len(rows) == self.batch_size:
                    break
                rows.append([])
                used = (0,) * len(self.limits)
            rows[-1].append(item)
            used = tuple(u + n for u, n in zip(used, sizes))
            self._advance()
        return rows

    def __next__(self) -> dict[str, np.ndarray]:
        return self._batch(self._rows())

    def one_pass(self, max_batches: int = 0) -> list[dict[str, np.ndarray]]:
        """The batches from here to the end of the current epoch (at most ``max_batches``, 0 = all),
        the last one padded with empty rows; no batches when there are no items."""
        batches: list[dict[str, np.ndarray]] = []
        epoch = self.epoch
        while len(self.items) and self.epoch == epoch and not (max_batches and len(batches) >= max_batches):
            batches.append(self._batch(self._rows(one_pass=True)))
        return batches
