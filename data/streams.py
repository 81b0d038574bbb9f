"""Sharded sources read in place: Parquet, JSONL (plain, .gz, .zst) and Hugging Face datasets, on any
filesystem fsspec knows (local paths, file://, memory://, gs:// with gcsfs, s3:// with s3fs, hf://).

A source is a sorted list of shards (files). A shard is read front to back as rows; each row is one
document: a string (``text_field``) or a list of token ids already tokenized (``token_field``). Nothing is
decompressed to disk: .gz goes through gzip, .zst through a zstandard stream reader, Parquet row group by row
group, a saved HF dataset's Arrow files batch by batch. ``read_rows(shard, start)`` starts at a row, so a
resume reads only from where it stopped.

Kinds:
  "jsonl"    .jsonl / .json / .jsonl.gz / .json.gz / .jsonl.zst / .json.zst files (a file, directory or glob)
  "parquet"  .parquet files (a file, directory or glob)
  "prepared" a directory written by ``qkv data prepare``: each shard's rows as token ids in array_record
  "hf"       a directory written by ``datasets.save_to_disk`` (a Dataset, or the ``train`` split of a
             DatasetDict), or a directory/glob of an HF dataset's Parquet/JSON(L) files

Every bad input raises ``UserError`` naming the shard and row: an unreadable or truncated shard, a missing
column, a value that is not a string (or not a list of ints), a path that matches nothing, an unknown URL scheme.
"""
from __future__ import annotations

import dataclasses
import gzip
import io
import json
import posixpath
from collections.abc import Iterator
from typing import Any

from qkv.errors import UserError

STREAM_KINDS = ("jsonl", "parquet", "hf", "prepared")
PREPARED_MANIFEST = "qkv-prepared.json"  # written by `qkv data prepare` (tools/data_tools.py)
JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")
_HF_DATA_SUFFIXES = (".parquet", ".arrow") + JSONL_SUFFIXES
_READ_ERRORS = (OSError, EOFError, ValueError, KeyError, IndexError)  # pyarrow's errors subclass these


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) of a local path or URL; an unknown scheme is a UserError."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ValueError, ImportError) as err:
        scheme = url.split("://", 1)[0] if "://" in url else url
        raise UserError(f"data path {url!r}: cannot open URL scheme {scheme!r} ({err}): use a local path or a "
                        f"scheme fsspec knows (file://, memory://, gs:// with gcsfs, s3:// with s3fs, hf://)") from None


@dataclasses.dataclass(frozen=True)
class Shard:
    """One file of a source: where it is and how to read it."""

    fs: Any
    path: str
    fmt: str  # "jsonl" | "parquet" | "arrow"
    text_field: str = "text"
    token_field: str = ""  # set: rows are token ids in this column

    @property
    def name(self) -> str:
        return self.fs.unstrip_protocol(self.path)


def _fmt(path: str) -> str | None:
    if path.endswith(".parquet"):
        return "parquet"
    if path.endswith(".arrow"):
        return "arrow"
    if path.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return None


def _expand(fs: Any, path: str, url: str, suffixes: tuple[str, ...]) -> list[str]:
    if any(c in path for c in "*?["):
        found = sorted(p for p in fs.glob(path) if fs.isfile(p))
        what = f"glob {url!r} matches"
    elif fs.isdir(path):
        found = sorted(p for p in fs.find(path) if not any(part.startswith(".") for part in p.split("/")[-1:]))
        what = f"directory {url!r} holds"
    elif fs.exists(path):
        found = [path]
        what = f"file {url!r} is"
    else:
        raise UserError(f"data path {url!r} does not exist: point data.path at a file, directory or glob")
    shards = [p for p in found if p.endswith(suffixes)]
    if not shards:
        raise UserError(f"{what} no {'/'.join(suffixes)} file: point data.path at the shards")
    return shards


def list_shards(kind: str, url: str, text_field: str = "text", token_field: str = "",
                split: str = "train") -> list[Shard]:
    """The shards of a source in a stable (sorted) order; ``split`` picks a saved DatasetDict's split."""
    if kind not in STREAM_KINDS:
        raise UserError(f"unknown source kind {kind!r}: use one of {STREAM_KINDS}")
    if not url:
        raise UserError(f"source kind {kind!r} needs a path: set data.path (a file, directory, glob or URL)")
    fs, path = filesystem(url)
    if kind == "prepared":
        return _prepared_shards(fs, path.rstrip("/"), url, split)
    if kind == "hf":
        files = _hf_files(fs, path.rstrip("/"), url, split)
    else:
        files = _expand(fs, path, url, (".parquet",) if kind == "parquet" else JSONL_SUFFIXES)
    return [Shard(fs, p, _fmt(p) or kind, text_field, token_field) for p in files]


def _prepared_shards(fs: Any, path: str, url: str, split: str) -> list[Shard]:  # noqa: ARG001 - one split per dir
    manifest = posixpath.join(path, PREPARED_MANIFEST)
    if not fs.exists(manifest):
        raise UserError(f"{url!r} has no {PREPARED_MANIFEST}: point data.path at a directory `qkv data prepare` wrote")
    if "://" in url and not url.startswith("file://"):
        raise UserError(f"prepared data {url!r}: array_record is read from local paths only; copy it to local disk")
    names = json.loads(fs.cat_file(manifest))["shards"]
    return [Shard(fs, posixpath.join(path, n), "array_record", token_field="tokens") for n in names]


def _hf_files(fs: Any, path: str, url: str, split: str) -> list[str]:
    """A save_to_disk directory's Arrow files (its state.json lists them), else the data files under ``path``."""
    if fs.isdir(path) and fs.exists(posixpath.join(path, "dataset_dict.json")):
        splits = json.loads(fs.cat_file(posixpath.join(path, "dataset_dict.json")))["splits"]
        if split not in splits:
            raise UserError(f"HF dataset {url!r} has splits {splits}, not {split!r}: save a {split!r} split")
        path = posixpath.join(path, split)
    state = posixpath.join(path, "state.json")
    if fs.isdir(path) and fs.exists(state):
        names = [f["filename"] for f in json.loads(fs.cat_file(state))["_data_files"]]
        return [posixpath.join(path, n) for n in names]
    return _expand(fs, path, url, _HF_DATA_SUFFIXES)


@dataclasses.dataclass(frozen=True)
class Row:
    index: int  # 0-based row in the shard (JSONL: the line)
    doc: Any  # str, or list[int] when the shard's token_field is set


def read_rows(shard: Shard, start: int = 0) -> Iterator[Row]:
    """The shard's rows from row ``start`` on, checked (see module docstring)."""
    reader = {"jsonl": _jsonl_rows, "parquet": _parquet_rows, "arrow": _arrow_rows,
              "array_record": _array_record_rows}[shard.fmt]
    try:
        yield from reader(shard, start)
    except UserError:
        raise
    except _READ_ERRORS as err:
        raise UserError(f"shard {shard.name}: cannot read it ({err.__class__.__name__}: {str(err)[:200]}): "
                        "the file is truncated or not a valid shard; replace or remove it") from None


def _check(shard: Shard, row: int, value: Any, where: str) -> Any:
    if shard.token_field:
        if not isinstance(value, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                           for t in value):
            raise UserError(f"shard {shard.name} {where} {row}: column {shard.token_field!r} is "
                            f"{type(value).__name__}, not a list of token ids: store ints, or use data.text_field")
        return list(value)
    if not isinstance(value, str):
        raise UserError(f"shard {shard.name} {where} {row}: field {shard.text_field!r} is {type(value).__name__}, "
                        "not a string: store the text as a string")
    return value


class _ZstdLines(io.RawIOBase):
    """A .zst file's decompressed bytes, frame after frame, streamed; a frame cut short raises EOFError
    (zstandard's stream reader ends quietly there)."""

    def __init__(self, raw: Any):
        import zstandard

        self._raw, self._zstd = raw, zstandard
        self._dobj, self._fed, self._pending, self._at = zstandard.ZstdDecompressor().decompressobj(), False, b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self._at == len(self._pending):
            self._pending, self._at = b"", 0
            chunk = self._raw.read(1 << 20)
            if not chunk:
                if self._fed and not self._dobj.eof:
                    raise EOFError("the last zstandard frame is cut short")
                return 0
            while chunk:
                if self._dobj.eof:  # the next frame
                    self._dobj = self._zstd.ZstdDecompressor().decompressobj()
                self._pending += self._dobj.decompress(chunk)
                self._fed, chunk = True, self._dobj.unused_data if self._dobj.eof else b""
        n = min(len(buffer), len(self._pending) - self._at)
        buffer[:n] = memoryview(self._pending)[self._at:self._at + n]
        self._at += n
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def _open_text(shard: Shard) -> Any:
    raw = shard.fs.open(shard.path, "rb")
    if shard.path.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)
    if shard.path.endswith(".zst"):
        return io.BufferedReader(_ZstdLines(raw))
    return raw


def _jsonl_rows(shard: Shard, start: int) -> Iterator[Row]:
    field = shard.token_field or shard.text_field
    try:
        import zstandard

        zstd_errors: tuple[type[BaseException], ...] = (zstandard.ZstdError,)
    except ImportError:
        zstd_errors = ()
    with _open_text(shard) as f:
        try:
            for index, raw in enumerate(f):
                if index < start or not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                except ValueError as err:
                    raise UserError(f"shard {shard.name} line {index + 1}: malformed JSON ({err.__class__.__name__}): "
                                    "fix or remove the line (a truncated shard ends in one)") from None
                if not isinstance(record, dict) or field not in record:
                    raise UserError(f"shard {shard.name} line {index + 1}: record has no field {field!r}: set "
                                    f"data.{'token' if shard.token_field else 'text'}_field to the field that holds it")
                yield Row(index, _check(shard, index + 1, record[field], "line"))
        except zstd_errors as err:
            raise UserError(f"shard {shard.name}: cannot decompress it ({err}): the file is truncated or not "
                            "zstandard; replace or remove it") from None


def _column(shard: Shard, names: list[str]) -> str:
    field = shard.token_field or shard.text_field
    if field not in names:
        raise UserError(f"shard {shard.name}: no column {field!r} (columns: {names}): set "
                        f"data.{'token' if shard.token_field else 'text'}_field to the column that holds it")
    return field


def _parquet_rows(shard: Shard, start: int) -> Iterator[Row]:
    import pyarrow.parquet as pq

    with shard.fs.open(shard.path, "rb") as f:
        pf = pq.ParquetFile(f)
        field = _column(shard, pf.schema_arrow.names)
        first = 0
        for group in range(pf.num_row_groups):
            n = pf.metadata.row_group(group).num_rows
            if first + n > start:
                values = pf.read_row_group(group, columns=[field]).column(0).to_pylist()
                for i in range(max(start - first, 0), n):
                    yield _row(shard, first + i, values[i])
            first += n


def _arrow_rows(shard: Shard, start: int) -> Iterator[Row]:
    import pyarrow as pa

    with shard.fs.open(shard.path, "rb") as f:
        reader = pa.ipc.open_stream(f)
        field = _column(shard, reader.schema.names)
        first = 0
        for batch in reader:
            n = batch.num_rows
            if first + n > start:
                values = batch.column(field).to_pylist()
                for i in range(max(start - first, 0), n):
                    yield _row(shard, first + i, values[i])
            first += n


def _array_record_rows(shard: Shard, start: int) -> Iterator[Row]:
    import numpy as np
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(shard.path)
    try:
        n = reader.num_records()
        for first in range(start, n, 1024):
            records = reader.read(list(range(first, min(first + 1024, n))))
            for i, record in enumerate(records):
                yield Row(first + i, np.frombuffer(record, np.int32).tolist())
    finally:
        reader.close()


def _row(shard: Shard, index: int, value: Any) -> Row:
    if value is None:
        raise UserError(f"shard {shard.name} row {index}: column {shard.token_field or shard.text_field!r} is null: "
                        "drop or fill the empty rows")
    return Row(index, _check(shard, index, value, "row"))


def compressed_or_remote(path: str | None) -> bool:
    """Whether a JSONL path must be streamed: a URL, or compressed files (.gz/.zst) at the path, under the
    directory or matched by the glob (the TFDS-built path reads plain local JSONL only)."""
    import glob
    import itertools
    import os

    if not path:
        return False
    if "://" in path or path.endswith((".gz", ".zst")):
        return True
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        names = (n for _, _, files in os.walk(path) for n in files)
    else:
        names = (os.path.basename(p) for p in glob.iglob(path, recursive=True))
    return any(n.endswith((".gz", ".zst")) for n in itertools.islice(names, 10_000))
