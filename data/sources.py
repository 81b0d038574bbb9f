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

Splits: callers ask for a role, "train" or "validation" (the evaluation split), or name a split. `resolve_split`
turns a role into a TFDS split expression (slices included: ``train[:99%]``, ``train[99%:]``, ``train+test``):
the configured ``train_split`` / ``eval_split``, else what the dataset has: validation, else test, else a
held-out slice of train (the rest of train is then trained on). A choice other than "validation" is logged.
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from qkv.errors import UserError

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
    raise UserError(f"a record's {text_field!r} is a {type(record).__name__}, not text (str or bytes): point "
                    "data.text_field at a text feature")


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


_SPLIT_PART = re.compile(r"^\s*([A-Za-z_][\w-]*)\s*(\[[^\]]*\])?\s*$")


def _check_split(split: str, allowed: Sequence[str]) -> None:
    """A TFDS split expression over ``allowed`` names: ``name``, ``name[a:b]`` (ints or %), joined by ``+``."""
    for part in split.split("+"):
        match = _SPLIT_PART.match(part)
        if not match or match.group(1) not in allowed:
            raise UserError(f"split {split!r} does not exist: use one of {tuple(allowed)}, a slice such as "
                            f"'{allowed[0] if allowed else 'train'}[:99%]', or several joined by '+'")


def resolve_split(split: str, available: Sequence[str], train_split: str = "train", eval_split: str = "",
                  held_out: float = 0.01) -> tuple[str, str]:
    """(TFDS split expression, how it was chosen) for the role "train" / "validation" or a named split."""
    available = list(available)
    base = _SPLIT_PART.match(train_split.split("+")[0])
    whole_train = base is not None and base.group(2) is None and "+" not in train_split
    auto = next((name for name in ("validation", "test") if name in available), None)
    keep = max(1, min(99, round(100 * (1 - held_out))))  # % of train trained on when a slice is held out
    if split == "train":
        chosen, how = train_split, "data.train_split"
        if not eval_split and auto is None and whole_train:
            chosen, how = f"{train_split}[:{keep}%]", f"no validation or test split: {100 - keep}% of it held out"
    elif split == "validation":
        if eval_split:
            chosen, how = eval_split, "data.eval_split"
        elif auto is not None:
            chosen, how = auto, "validation" if auto == "validation" else "the dataset has no validation split"
        elif whole_train:
            chosen, how = f"{train_split}[{keep}%:]", "no validation or test split: a held-out slice of train"
        else:
            raise UserError(f"the dataset has no validation or test split (it has {tuple(available)}) and "
                            f"data.train_split={train_split!r} is a slice: set data.eval_split, e.g. "
                            f"data.eval_split='train[99%:]'")
    else:
        chosen, how = split, "asked for"
    try:
        _check_split(chosen, available)
    except UserError as err:
        key = f"{how}={chosen!r}: " if how.startswith("data.") else ""
        raise UserError(key + str(err)) from None
    return chosen, how


def _log_split(name: str, role: str, chosen: str, how: str) -> None:
    if chosen != role:
        logging.getLogger("qkv.data").warning("%s: %s split = %s (%s)", name, role, chosen, how)


def _open_local(kind: str, path: str | None, split: str, data_dir: Path, text_field: str,
                validation_fraction: float, train_split: str = "train", eval_split: str = "") -> TextSource:
    from .corpus import make_spec
    from .text_builder import build_text_dataset

    split, _ = resolve_split(split, SPLITS, train_split, eval_split)
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
        raise UserError(
            f"TFDS dataset {name!r} is not in the TFDS catalog: check the name"
        ) from None


def open_catalog(name: str, split: str, data_dir: str | Path, fields: Sequence[str],
                 fix: str, train_split: str = "train", eval_split: str = "") -> tuple[Any, Any]:
    """(builder, array_record data source of `split`) of a prepared TFDS catalog dataset; `split` is a role
    or a split expression (see `resolve_split`).

    Raises ValueError with the fix when the name is not in the catalog, the dataset is not prepared
    in `data_dir` (with the `tfds build ... --file_format=array_record` command), it is stored in a
    format that needs TensorFlow, the split does not exist, or a top-level feature named in `fields`
    is missing (`fix` says which setting names it, e.g. "set data.text_field").
    """
    hint = f"tfds build {name} --file_format=array_record --data_dir={data_dir}"
    builder = _catalog_builder(name, data_dir)
    if not builder.is_prepared():
        raise UserError(
            f"TFDS dataset {name!r} is not prepared in '{data_dir}': prepare it first with `{hint}`"
        )
    formats = {f.value for f in builder.info.available_file_formats()}
    if "array_record" not in formats:
        raise UserError(
            f"TFDS dataset {name!r} in '{data_dir}' is stored as {sorted(formats)}, which needs "
            f"TensorFlow to read: rebuild it with `{hint}`"
        )
    role = split
    split, how = resolve_split(role, list(builder.info.splits), train_split, eval_split)
    _log_split(f"TFDS dataset {name!r}", role, split, how)
    for field in fields:
        if field not in builder.info.features:
            raise UserError(
                f"TFDS dataset {name!r} has no feature {field!r} "
                f"(features: {sorted(builder.info.features)}): {fix}"
            )
    return builder, builder.as_data_source(split=split, file_format="array_record")


def _open_catalog(name: str, split: str, data_dir: Path, text_field: str, train_split: str,
                  eval_split: str) -> TextSource:
    _, inner = open_catalog(name, split, data_dir, [text_field], "set data.text_field", train_split, eval_split)
    return TextSource(inner, text_field, f"tfds:{name}:{split}")


def open_text_source(
    kind: str,
    path: str | None,
    split: str,
    data_dir: str | Path,
    text_field: str = "text",
    tfds_name: str | None = None,
    validation_fraction: float = 0.01,
    train_split: str = "train",
    eval_split: str = "",
) -> TextSource:
    """Opens a corpus split as a random-access source of `str` documents.

    Local kinds ("stdlib", "files", "jsonl") are built once into `data_dir` (cached by a
    fingerprint of the input) with splits "train" and "validation". For kind "tfds", `tfds_name`
    (or `path`) names a catalog dataset that must already be prepared as array_record. `split` is a role
    ("train", "validation") or a split expression; `train_split`/`eval_split` name the roles' splits.
    """
    data_dir = Path(data_dir).expanduser()
    if kind == "tfds":
        name = tfds_name or path
        if not name:
            raise UserError(
                "kind 'tfds' needs a dataset name: pass data.tfds_name=NAME (e.g. lm1b)"
            )
        source = _open_catalog(name, split, data_dir, text_field, train_split, eval_split)
    else:
        if kind == "stdlib" and path:
            raise UserError("kind 'stdlib' takes no path: drop data.path or use kind='files'")
        source = _open_local(kind, path, split, data_dir, text_field, validation_fraction, train_split, eval_split)
    if len(source) == 0:
        raise UserError(f"{source!r} is empty: point the corpus at non-empty text")
    return source
