"""Grain pipelines that turn a text source into packed, checkpointable LM batches.

Batch contract (every array int32, shape [batch_size, seq_len]):
  inputs       token ids fed to the model (0 = padding)
  targets      next-token ids: targets[t] is the token after inputs[t] in the same document
  segment_ids  1, 2, 3, ... for each document piece in the row, 0 on padding
  positions    0-based position within the document piece (restarts at 0 in every piece)
  loss_mask    1 where the target counts, 0 on padding

Each document becomes tokens = [bos] + encode(text) + [eos], and inputs=tokens[:-1],
targets=tokens[1:] are cut per document *before* packing, so no target crosses a document
boundary. Packing is Grain's ConcatThenSplit: pieces are laid end to end and a document that does
not fit is split at the row end and continues in the next row (as a new segment whose positions
restart at 0). Rows are therefore full except at the very end of a finite pass. With pack=False
each row holds one piece of one document (documents are cut into seq_len chunks), padded.

Order of operations: source -> shard by process ([shard_index::shard_count]) -> shuffle (seeded,
reshuffled every epoch) -> repeat -> tokenize -> pack -> shuffle rows in windows of `shuffle_rows`
-> batch. The row shuffle matters because packing lays a long document out over many consecutive
rows: without it, a 100 KB file fills a dozen 16 x 128-token batches in a row, and those batches'
gradients all say the same thing (on the stdlib default run it cost 0.23 validation bits/byte after
520 steps; docs/benchmarks.md). Everything is deterministic given the seed. `iter(ds).get_state()` is plain JSON (dicts, lists, ints) and `set_state` accepts it
back, including after a JSON round trip (see `_JsonStateIterator` for why that needs care).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np
from grain.experimental import (ConcatThenSplitIterDataset, FlatMapIterDataset, FlatMapTransform,
                                WindowShuffleIterDataset)

from .sources import record_text
from qkv.errors import UserError

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
PAD_ID = 0


class _Tokenize:
    """record -> {'inputs', 'targets'} int32 arrays of one document (targets shifted by one)."""

    def __init__(self, encode: Callable[[str], list[int]], bos_id: int, eos_id: int):
        self._encode, self._bos, self._eos = encode, bos_id, eos_id

    def __call__(self, record: Any) -> dict[str, np.ndarray]:
        ids = self._encode(record_text(record))
        tokens = np.empty(len(ids) + 2, dtype=np.int32)
        tokens[0], tokens[-1] = self._bos, self._eos
        tokens[1:-1] = ids
        return {"inputs": tokens[:-1], "targets": tokens[1:]}


class _Chunk(FlatMapTransform):
    """Cuts a document's (inputs, targets) into <= seq_len pieces (pack=False path)."""

    max_fan_out = 1 << 30  # Only the MapDataset flat-map uses it; documents vary widely.

    def __init__(self, seq_len: int):
        self._seq_len = seq_len

    def flat_map(self, element: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        n = len(element["inputs"])
        return [
            {k: v[s : s + self._seq_len] for k, v in element.items()}
            for s in range(0, n, self._seq_len)
        ]


def _pad_row(element: dict[str, np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
    """One document piece -> a full row in the packed layout (segment 1, padding 0)."""
    n = len(element["inputs"])
    row = {}
    for k in ("inputs", "targets"):
        row[k] = np.zeros(seq_len, np.int32)
        row[k][:n] = element[k]
    row["inputs_segment_ids"] = (np.arange(seq_len) < n).astype(np.int32)
    row["inputs_positions"] = np.where(np.arange(seq_len) < n, np.arange(seq_len), 0).astype(
        np.int32
    )
    return row


def _finalize_row(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Packed row (grain's key names) -> the batch contract's keys, all int32."""
    segment_ids = np.asarray(row["inputs_segment_ids"], np.int32)
    return {
        "inputs": np.asarray(row["inputs"], np.int32),
        "targets": np.asarray(row["targets"], np.int32),
        "segment_ids": segment_ids,
        "positions": np.asarray(row["inputs_positions"], np.int32),
        "loss_mask": (segment_ids > 0).astype(np.int32),
    }


def _to_json_native(obj: Any) -> Any:
    """Tuples -> lists, numpy scalars -> Python numbers: what a JSON round trip yields."""
    if isinstance(obj, dict):
        return {str(k): _to_json_native(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_json_native(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _from_json_native(obj: Any) -> Any:
    """Restores what JSON loses in Grain's iterator states.

    ConcatThenSplit stores slices as tuples and tests `slice != (-1, -1)`; after JSON the list
    [-1, -1] compares unequal, so a restored iterator would read an empty remainder and diverge
    (seen with grain 0.2.18). Its slices are turned back into tuples here.
    """
    if isinstance(obj, dict):
        out = {k: _from_json_native(v) for k, v in obj.items()}
        slices = out.get("remainder_slices")
        if isinstance(slices, dict):
            out["remainder_slices"] = {k: tuple(v) for k, v in slices.items()}
        return out
    if isinstance(obj, list):
        return [_from_json_native(v) for v in obj]
    return obj


class _JsonStateIterator(grain.DatasetIterator):
    """Passes elements through; exposes the parent's state as JSON-native data."""

    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)

    def __next__(self) -> Any:
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return _to_json_native(self._parent.get_state())

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(_from_json_native(_to_json_native(state)))


class _JsonStateIterDataset(grain.IterDataset):
    def __iter__(self) -> _JsonStateIterator:
        return _JsonStateIterator(self._parent.__iter__())

    def __str__(self) -> str:
        return "JsonStateIterDataset"


def iterator_state_to_json(state: dict[str, Any]) -> str:
    """Serialises `iter(ds).get_state()` (e.g. to store it next to a checkpoint)."""
    return json.dumps(_to_json_native(state), sort_keys=True)


def iterator_state_from_json(text: str) -> dict[str, Any]:
    """Parses `iterator_state_to_json` output into a state `set_state` accepts."""
    return _from_json_native(json.loads(text))


def _check_args(n_docs: int, seq_len: int, batch_size: int, shard_index: int,
                shard_count: int, num_epochs: int | None) -> None:
    if seq_len < 1 or batch_size < 1:
        raise UserError(f"seq_len={seq_len}, batch_size={batch_size}: both must be >= 1")
    if not 0 <= shard_index < shard_count:  # the caller's process index and count: a bug, not the user's input
        raise ValueError(
            f"shard_index={shard_index} is not in [0, shard_count={shard_count}): "
            "pass the process index and process count"
        )
    if n_docs < shard_count:
        raise UserError(
            f"source has {n_docs} documents for {shard_count} shards: every shard needs at "
            "least one; use a bigger corpus or fewer processes"
        )
    if num_epochs is not None and num_epochs < 1:
        raise UserError(f"num_epochs={num_epochs}: use a positive int, or None to repeat forever")


def _token_rows(source: Sequence[Any], encode: Callable[[str], list[int]], *, seq_len: int,
                seed: int, shard_index: int, shard_count: int, bos_id: int, eos_id: int,
                num_epochs: int | None, shuffle: bool, pack: bool,
                read_options: grain.ReadOptions | None) -> grain.IterDataset:
    """Unbatched rows in the batch contract (see module docstring)."""
    ds = grain.MapDataset.source(source)
    if shard_count > 1:
        ds = ds[shard_index::shard_count]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)  # reshuffles each epoch (seed folded with the epoch)
    ds = ds.map(_Tokenize(encode, bos_id, eos_id))
    # One prefetch thread tokenizes ahead of packing; on 2 cores more threads only add contention.
    it_ds = ds.to_iter_dataset(
        read_options or grain.ReadOptions(num_threads=1, prefetch_buffer_size=16)
    )
    if pack:
        it_ds = ConcatThenSplitIterDataset(
            it_ds, length_struct={"inputs": seq_len, "targets": seq_len}
        )
    else:
        it_ds = FlatMapIterDataset(it_ds, _Chunk(seq_len)).map(lambda e: _pad_row(e, seq_len))
    return it_ds.map(_finalize_row)


def make_lm_dataset(
    source: Sequence[Any],
    tokenizer_encode: Callable[[str], list[int]],
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
    bos_id: int,
    eos_id: int,
    num_epochs: int | None = None,
    shuffle: bool = True,
    pack: bool = True,
    shuffle_rows: int = 0,
    read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
    """Training batches (see module docstring); infinite when num_epochs is None.

    ``shuffle_rows`` > 1 (with ``shuffle``) shuffles the packed rows within consecutive windows of that
    many rows (seeded; the window is rebuilt from its start on resume), so one batch mixes many documents.

    The last partial batch of a finite pass is dropped (drop_remainder) so every batch has the
    same shape; use `make_eval_dataset` for a pass that keeps everything.
    """
    _check_args(len(source), seq_len, batch_size, shard_index, shard_count, num_epochs)
    rows = _token_rows(source, tokenizer_encode, seq_len=seq_len, seed=seed,
                       shard_index=shard_index, shard_count=shard_count, bos_id=bos_id,
                       eos_id=eos_id, num_epochs=num_epochs, shuffle=shuffle, pack=pack,
                       read_options=read_options)
    if shuffle and shuffle_rows > 1:
        rows = WindowShuffleIterDataset(rows, window_size=shuffle_rows, seed=seed + 1)
    return _JsonStateIterDataset(rows.batch(batch_size, drop_remainder=True))


def _pad_batch(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """Pads a short final batch with all-padding rows (loss_mask 0) to batch_size rows."""
    n = batch["inputs"].shape[0]
    if n == batch_size:
        return batch
    return {k: np.pad(v, ((0, batch_size - n), (0, 0))) for k, v in batch.items()}


def make_eval_dataset(
    source: Sequence[Any],
    tokenizer_encode: Callable[[str], list[int]],
    *,
    seq_len: int,
    batch_size: int,
    bos_id: int,
    eos_id: int,
    shard_index: int = 0,
    shard_count: int = 1,
    pack: bool = True,
    read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
    """One ordered pass over the source (no shuffle), every token seen exactly once.

    The last batch is padded with empty rows (loss_mask 0) instead of dropped, so shapes stay
    static for jit. Shards may yield different numbers of batches; multi-process evaluation
    should run a fixed number of steps or combine per-process sums.
    """
    _check_args(len(source), seq_len, batch_size, shard_index, shard_count, 1)
    rows = _token_rows(source, tokenizer_encode, seq_len=seq_len, seed=0,
                       shard_index=shard_index, shard_count=shard_count, bos_id=bos_id,
                       eos_id=eos_id, num_epochs=1, shuffle=False, pack=pack,
                       read_options=read_options)
    batches = rows.batch(batch_size, drop_remainder=False).map(
        lambda b: _pad_batch(b, batch_size)
    )
    return _JsonStateIterDataset(batches)
