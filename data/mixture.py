"""Packed LM batches streamed from sharded sources (data/streams.py), one source or a weighted mixture.

Nothing is preprocessed before the first step: each process reads its own shards (shard i goes to process
i % process_count), tokenizes documents as it reaches them and packs them into rows, with the same batch
contract as data/pipeline.py (inputs, targets, segment_ids, positions, loss_mask; a document is
[bos] + ids + [eos], cut into inputs/targets before packing; a document that does not fit continues in the
next row as a new segment whose positions restart at 0).

Order: every epoch visits this process's shards in a seeded order (a new permutation per epoch), each shard
front to back; packed rows are shuffled in windows of ``shuffle_rows`` rows (seeded per window).

Split: a source without its own evaluation path holds out the rows whose key (shard ordinal, row) hashes
below ``validation_fraction``, the same rows for every format and filesystem the shards come in.

Mixture: each row of a batch comes from one source, picked by a deterministic weighted sampler (the source
furthest below its share since the weights were last set), so the row shares equal the weights within one
row at every step. Changing the weights on resume is allowed: the sampler keeps the rows drawn so far and
aims at the new shares from there (logged).

State (``get_state``, plain JSON): per source the cursor (epoch, shard position, row, token offset in the
row's document) at the start of its current shuffle window and the rows taken from that window; the sampler's
counts and weights. ``set_state`` re-reads the window from that cursor, so a resume is exact.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from .corpus import unit_hash
from .streams import Shard, read_rows
from qkv.errors import UserError

_log = logging.getLogger("qkv.data")


@dataclasses.dataclass(frozen=True)
class StreamSource:
    """One source of a mixture: its train shards, optional own evaluation shards, weight and name."""

    name: str
    shards: tuple[Shard, ...]
    weight: float = 1.0
    eval_shards: tuple[Shard, ...] = ()  # empty: hold out a hashed fraction of the train shards' rows


class RowStream:
    """Packed rows of one source's split on this process (see module docstring)."""

    def __init__(self, source: StreamSource, encode: Callable[[str], list[int]], *, split: str, seq_len: int,
                 seed: int, bos_id: int, eos_id: int, validation_fraction: float, shuffle_rows: int = 0,
                 num_epochs: int | None = None, process_index: int = 0, process_count: int = 1):
        own_eval = split == "validation" and bool(source.eval_shards)
        shards = source.eval_shards if own_eval else source.shards
        self._hold_out = None if (source.eval_shards or validation_fraction <= 0) else (split == "validation")
        if len(shards) < process_count:
            raise UserError(f"source {source.name!r} has {len(shards)} shard(s) for {process_count} processes: "
                            "every process reads whole shards; split the data into more files or use fewer processes")
        self.name = source.name
        self._shards = [(i, s) for i, s in enumerate(shards)][process_index::process_count]
        self._encode, self._bos, self._eos = encode, bos_id, eos_id
        self._seq_len, self._seed, self._fraction = seq_len, seed, validation_fraction
        self._window = max(shuffle_rows, 1)
        self._shuffle = shuffle_rows > 1
        self._epochs = num_epochs
        self.set_state({"window": 0, "start": [0, 0, 0, 0], "taken": 0})

    # -- documents and rows ---------------------------------------------------------------------
    def _order(self, epoch: int) -> list[int]:
        if not self._shuffle:
            return list(range(len(self._shards)))
        return np.random.default_rng([self._seed, epoch]).permutation(len(self._shards)).tolist()

    def _keep(self, ordinal: int, row: int) -> bool:
        if self._hold_out is None:
            return True
        return (unit_hash(f"{ordinal}:{row}") < self._fraction) == self._hold_out

    def _tokens(self, doc: Any) -> np.ndarray | None:
        ids = doc if isinstance(doc, list) else (self._encode(doc) if doc.strip() else None)
        if not ids:
            return None
        tokens = np.empty(len(ids) + 2, np.int32)
        tokens[0], tokens[-1], tokens[1:-1] = self._bos, self._eos, ids
        return tokens

    def documents(self, epoch: int = 0, k: int = 0, row: int = 0) -> Iterator[tuple[list[int], np.ndarray | Any]]:
        """([epoch, shard position, row], tokens) of each document from that cursor on."""
        while self._epochs is None or epoch < self._epochs:
            order, found, whole = self._order(epoch), False, k == 0 and row == 0
            for k in range(k, len(order)):
                ordinal, shard = self._shards[order[k]]
                for r in read_rows(shard, row):
                    if self._keep(ordinal, r.index):
                        tokens = self._tokens(r.doc)
                        if tokens is not None:
                            found = True
                            yield [epoch, k, r.index], tokens
                row = 0
            if not found and whole:
                raise UserError(f"source {self.name!r} has no non-empty document in this process's shards for "
                                "this split: add data, raise data.validation_fraction (the held-out share of "
                                "rows), or give the source its own evaluation path (eval_path)")
            epoch, k = epoch + 1, 0

    def texts(self, n: int) -> list[str]:
        """The first ``n`` text documents of the first epoch (to train a tokenizer on)."""
        out = []
        for ordinal, shard in self._shards:
            for r in read_rows(shard):
                if self._keep(ordinal, r.index) and isinstance(r.doc, str) and r.doc.strip():
                    out.append(r.doc)
                    if len(out) == n:
                        return out
        return out

    def _rows(self, cursor: Sequence[int]) -> Iterator[tuple[dict[str, np.ndarray], list[int] | None]]:
        """(row, cursor after it) from ``cursor``; a finite pass ends with a padded partial row."""
        n = self._seq_len
        offset = cursor[3]
        row = _empty_row(n)
        fill, segment = 0, 0
        for at, tokens in self.documents(*cursor[:3]):
            length, pos, offset = len(tokens) - 1, offset, 0
            while pos < length:
                take = min(length - pos, n - fill)
                segment += 1
                row["inputs"][fill:fill + take] = tokens[pos:pos + take]
                row["targets"][fill:fill + take] = tokens[pos + 1:pos + take + 1]
                row["segment_ids"][fill:fill + take] = segment
                row["positions"][fill:fill + take] = np.arange(take)
                pos, fill = pos + take, fill + take
                if fill == n:
                    row["loss_mask"][:] = 1
                    yield row, at + [pos]
                    row, fill, segment = _empty_row(n), 0, 0
        if fill:
            row["loss_mask"][:fill] = 1
            yield row, None

    # -- windows and state ----------------------------------------------------------------------
    def _fill(self) -> None:
        rows = []
        while len(rows) < self._window and self._next_start is not None:
            try:
                row, self._next_start = next(self._gen)
            except StopIteration:
                self._next_start = None
                break
            rows.append(row)
        if self._shuffle and len(rows) > 1:
            perm = np.random.default_rng([self._seed, 1, self._state["window"]]).permutation(len(rows))
            rows = [rows[i] for i in perm]
        self._buf = rows

    def next_row(self) -> dict[str, np.ndarray]:
        """The next packed row; StopIteration at the end of a finite pass."""
        if self._buf is None:  # the window the state points into, read on first use
            self._fill()
            if self._state["taken"] > len(self._buf):
                raise UserError(f"source {self.name!r}: the saved data position is past the end of its data: the "
                                "shards changed since the checkpoint; restore them or start a new train.run_dir")
        if self._state["taken"] == len(self._buf):
            if self._next_start is None:
                raise StopIteration
            self._state = {"window": self._state["window"] + 1, "start": list(self._next_start), "taken": 0}
            self._fill()
            if not self._buf:
                raise StopIteration
        row = self._buf[self._state["taken"]]
        self._state["taken"] += 1
        return row

    def get_state(self) -> dict[str, Any]:
        return {"window": self._state["window"], "start": list(self._state["start"]), "taken": self._state["taken"]}

    def set_state(self, state: dict[str, Any]) -> None:
        self._state = {"window": int(state["window"]), "start": [int(x) for x in state["start"]],
                       "taken": int(state["taken"])}
        self._next_start: list[int] | None = self._state["start"]
        self._gen = self._rows(self._state["start"])
        self._buf: list[dict[str, np.ndarray]] | None = None


def _empty_row(n: int) -> dict[str, np.ndarray]:
    return {k: np.zeros(n, np.int32) for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask")}


class MixtureIterator:
    """Batches of rows drawn from several RowStreams in proportion to their weights (see module docstring).

    ``last_sources`` holds the source index of every row of the last batch (for per-source token counts).
    A finite pass (evaluation) drops each source as it runs out and pads the last batch with empty rows.
    """

    def __init__(self, streams: Sequence[RowStream], weights: Sequence[float], batch_size: int, *,
                 finite: bool = False):
        if not streams:
            raise UserError("data.mixture is empty: list at least one source")
        self.streams, self.batch_size, self._finite = list(streams), batch_size, finite
        self.weights = _normalized(weights)
        self._counts = [0] * len(streams)
        self._since = [0] * len(streams)  # counts when the weights were last set
        self._done = [False] * len(streams)
        self._tokens = [0] * len(streams)  # tokens the loss counts, per source
        self.last_sources: list[int] = []

    @staticmethod
    def shares(sources: Sequence[StreamSource]) -> list[float]:
        return _normalized([s.weight for s in sources])

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.streams]

    def _pick(self) -> int:
        drawn = [c - s for c, s in zip(self._counts, self._since)]
        total = sum(d for d, done in zip(drawn, self._done) if not done) + 1
        live = [w if not done else 0.0 for w, done in zip(self.weights, self._done)]
        norm = sum(live)
        deficits = [(w / norm) * total - d if w > 0 else -np.inf for w, d in zip(live, drawn)]
        return int(np.argmax(deficits))

    def __iter__(self) -> "MixtureIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows, sources = [], []
        while len(rows) < self.batch_size and not all(self._done):
            i = self._pick()
            try:
                rows.append(self.streams[i].next_row())
            except StopIteration:
                if not self._finite:
                    raise
                self._done[i] = True
                continue
            self._counts[i] += 1
            self._tokens[i] += int(rows[-1]["loss_mask"].sum())
            sources.append(i)
        if not rows or (len(rows) < self.batch_size and not self._finite):
            raise StopIteration
        while len(rows) < self.batch_size:
            rows.append(_empty_row(self.streams[0]._seq_len))
        self.last_sources = sources
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    def source_tokens(self) -> dict[str, int]:
        """Tokens drawn from each source so far (this process), by name."""
        return dict(zip(self.names, self._tokens))

    def get_state(self) -> dict[str, Any]:
        return {"sources": [s.get_state() for s in self.streams], "counts": list(self._counts),
                "tokens": list(self._tokens),
                "since": list(self._since), "weights": list(self.weights), "names": self.names}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("names", self.names) != self.names:
            raise UserError(f"the checkpoint's data mixture has sources {state.get('names')}, this run has "
                            f"{self.names}: keep the sources (weights may change) or start a new train.run_dir")
        for stream, s in zip(self.streams, state["sources"]):
            stream.set_state(s)
        self._counts = [int(c) for c in state["counts"]]
        self._tokens = [int(t) for t in state.get("tokens", self._counts)]
        old = [float(w) for w in state["weights"]]
        if np.allclose(old, self.weights, rtol=0, atol=1e-12):
            self._since = [int(c) for c in state["since"]]
        else:
            _log.warning("data mixture weights changed on resume: %s -> %s (aiming at the new shares from here)",
                         _fmt_weights(self.names, old), _fmt_weights(self.names, self.weights))
            self._since = list(self._counts)


def _normalized(weights: Sequence[float]) -> list[float]:
    for i, w in enumerate(weights):
        if not (isinstance(w, (int, float)) and np.isfinite(w) and w > 0):
            raise UserError(f"data.mixture[{i}].weight={w!r} must be a number > 0: use e.g. 0.5 (drop the source "
                            "to leave it out)")
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def _fmt_weights(names: Sequence[str], weights: Sequence[float]) -> str:
    return ", ".join(f"{n}={w:.4g}" for n, w in zip(names, weights))


class Texts(list):
    """Documents as a list with ``__getitems__`` (what tokenizer training samples from)."""

    def __getitems__(self, indices: Sequence[int]) -> list[str]:
        return [self[int(i)] for i in indices]


def open_sources(entries: Sequence[dict[str, Any]]) -> list[StreamSource]:
    """StreamSources of mixture entries ({kind, path, weight, text_field, token_field, eval_path, name})."""
    from .streams import list_shards

    if not entries:
        raise UserError("data.mixture is empty: list at least one source")
    sources = []
    for i, e in enumerate(entries):
        text_field, token_field = e.get("text_field") or "text", e.get("token_field") or ""
        shards = list_shards(e["kind"], e["path"], text_field, token_field)
        eval_shards = (list_shards(e["kind"], e["eval_path"], text_field, token_field, split="validation")
                       if e.get("eval_path") else [])
        sources.append(StreamSource(str(e.get("name") or f"{e['kind']}{i}"), tuple(shards),
                                    float(e.get("weight", 1.0)), tuple(eval_shards)))
    return sources
