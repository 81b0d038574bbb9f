"""Random-access text sources for the pipeline: local corpora via TFDS, or TFDS catalog datasets.

`open_text_source` returns a `TextSource`: `len(src)`, `src[i]` and `src.__getitems__([i, j])`,
each item being the document's text as `str`. Everything is read from array_record files through
`tfds` data sources, so no TensorFlow is needed.

Kinds:
  "stdlib"  the running Python's standard library (the default corpus; no path)
  "files"   a directory (recursive) or glob of text files; one document per file
  "jsonl"   a JSONL file, directory or glob; one document per record's `text_field`
  "tfds"    a TFDS catalog dataset (e.g. "lm1b") already prepared as array_record in data_dir

`open_catalog` (shared with the seq2seq and classification sources) opens and checks any prepared
catalog dataset's split and returns the builder with its raw array_record data source.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

SPLITS = ("train", "validation")


def record_text(record: Any, text_field: str = "text") -> str:
    """The text of a record: a str, UTF-8 bytes (decoded with errors='replace') or a dict."""
    if isinstance(record, dict):
        record = record[text_field]
    if isinstance(record, (bytes, bytearray, memoryview)):
        return bytes(record).decode("utf-8", errors="replace")
    if isinstance(record, str):
        return record
    # TFDS may hand back numpy scalars/0-d arrays of bytes.
    item = getattr(record, "item", None)
    if item is not None:
        return record_text(item(), text_field)
    raise TypeError(f"record of type {type(record).__name__} has no text: expected str or bytes")


class TextSource(Sequence):
    """Random access to the texts of an underlying TFDS data source (items are `str`)."""

    def __init__(self, inner: Any, text_field: str = "text", description: str = ""):
        self._inner = inner
        self._text_field = text_field
        self._description = description

    def __len__(self) -> int:
        return len(self._inner)

    def _item(self, record: Any, index: int) -> Any:
        """What item `index` is, given its record (subclasses return other item types)."""
        return record_text(record, self._text_field)

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        if not isinstance(index, int):
            # array_record sources reject slices; index with ints (or __getitems__ with a list).
            index = int(index)
        return self._item(self._inner[index], index)

    def __getitems__(self, indices: Sequence[int]) -> list[str]:
        indices = [int(i) for i in indices]
        records = self._inner.__getitems__(indices)
        return [self._item(r, i) for r, i in zip(records, indices)]

    def __iter__(self) -> Iterator[str]:
        # Explicit, chunked iteration: Sequence's default relies on IndexError past the end.
        for start in range(0, len(self), 64):
            yield from self.__getitems__(range(start, min(start + 64, len(self))))

    def __repr__(self) -> str:
        return f"TextSource({self._description}, {len(self)} documents)"


def _check_split(split: str, allowed: Sequence[str]) -> None:
    if split not in allowed:
        raise ValueError(f"split {split!r} does not exist: use one of {tuple(allowed)}")


def _open_local(kind: str, path: str | None, split: str, data_dir: Path, text_field: str,
                validation_fraction: float) -> TextSource:
    from .corpus import make_spec
    from .text_builder import build_text_dataset

    _check_split(split, SPLITS)
    spec = make_spec(kind, path, text_field, validation_fraction)
    builder = build_text_dataset(spec, str(data_dir))
    inner = builder.as_data_source(split=split)
    return TextSource(inner, "text", f"{kind}:{split} from {builder.data_dir}")


# Catalog datasets defined as modules of these packages (e.g. glue in `text`, wmt14_translate in
# `translate`) are registered only when their package is imported, which `import tensorflow_datasets`
# defers (lazy imports), so `tfds.builder` does not find them until then (seen with tfds 4.9.10).
# Those under `tensorflow_datasets/datasets/` (e.g. lm1b) are found by name without this.
_CATALOG_PACKAGES = (
    "audio", "graphs", "image", "image_classification", "object_detection", "question_answering",
    "ranking", "recommendation", "rl_unplugged", "robotics", "robomimic", "structured",
    "summarization", "text", "text_simplification", "time_series", "translate", "video",
    "vision_language", "nearest_neighbors", "d4rl",
)


def _catalog_builder(name: str, data_dir: str | Path) -> Any:
    import tensorflow_datasets as tfds

    try:
        return tfds.builder(name, data_dir=str(data_dir))
    except tfds.core.registered.DatasetNotFoundError:
        pass
    for package in _CATALOG_PACKAGES:
        try:
            importlib.import_module(f"tensorflow_datasets.{package}")
        except Exception:  # best effort: e.g. a package whose optional dependencies (h5py) are missing
            continue
    try:
        return tfds.builder(name, data_dir=str(data_dir))
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(
            f"TFDS dataset {name!r} is not in the TFDS catalog: check the name"
        ) from None


def open_catalog(name: str, split: str, data_dir: str | Path, fields: Sequence[str],
                 fix: str) -> tuple[Any, Any]:
    """(builder, array_record data source of `split`) of a prepared TFDS catalog dataset.

    Raises ValueError with the fix when the name is not in the catalog, the dataset is not prepared
    in `data_dir` (with the `tfds build ... --file_format=array_record` command), it is stored in a
    format that needs TensorFlow, the split does not exist, or a top-level feature named in `fields`
    is missing (`fix` says which setting names it, e.g. "set data.text_field").
    """
    hint = f"tfds build {name} --file_format=array_record --data_dir={data_dir}"
    builder = _catalog_builder(name, data_dir)
    if not builder.is_prepared():
        raise ValueError(
            f"TFDS dataset {name!r} is not prepared in '{data_dir}': prepare it first with `{hint}`"
        )
    formats = {f.value for f in builder.info.available_file_formats()}
    if "array_record" not in formats:
        raise ValueError(
            f"TFDS dataset {name!r} in '{data_dir}' is stored as {sorted(formats)}, which needs "
            f"TensorFlow to read: rebuild it with `{hint}`"
        )
    _check_split(split, list(builder.info.splits))
    for field in fields:
        if field not in builder.info.features:
            raise ValueError(
                f"TFDS dataset {name!r} has no feature {field!r} "
                f"(features: {sorted(builder.info.features)}): {fix}"
            )
    return builder, builder.as_data_source(split=split, file_format="array_record")


def _open_catalog(name: str, split: str, data_dir: Path, text_field: str) -> TextSource:
    _, inner = open_catalog(name, split, data_dir, [text_field], "set data.text_field")
    return TextSource(inner, text_field, f"tfds:{name}:{split}")


def open_text_source(
    kind: str,
    path: str | None,
    split: str,
    data_dir: str | Path,
    text_field: str = "text",
    tfds_name: str | None = None,
    validation_fraction: float = 0.01,
) -> TextSource:
    """Opens a corpus split as a random-access source of `str` documents.

    Local kinds ("stdlib", "files", "jsonl") are built once into `data_dir` (cached by a
    fingerprint of the input) with splits "train" and "validation". For kind "tfds", `tfds_name`
    (or `path`) names a catalog dataset that must already be prepared as array_record.
    """
    data_dir = Path(data_dir).expanduser()
    if kind == "tfds":
        name = tfds_name or path
        if not name:
            raise ValueError(
                "kind 'tfds' needs a dataset name: pass data.tfds_name=NAME (e.g. lm1b)"
            )
        source = _open_catalog(name, split, data_dir, text_field)
    else:
        if kind == "stdlib" and path:
            raise ValueError("kind 'stdlib' takes no path: drop data.path or use kind='files'")
        source = _open_local(kind, path, split, data_dir, text_field, validation_fraction)
    if len(source) == 0:
        raise ValueError(f"{source!r} is empty: point the corpus at non-empty text")
    return source
