"""Local corpora: finding files, reading documents, fingerprinting, splitting by document.

A *document* is one text file (kinds "stdlib" and "files") or one JSONL record ("jsonl"). Each
document has a stable key (its path relative to the corpus root, plus ":LINE" for JSONL), and the
train/validation split is a pure function of that key, so the same corpus always splits the same
way wherever it lives, and no document is in both splits.

Text files are read as bytes and decoded as UTF-8 with errors='replace': a stray non-UTF-8 byte
(the stdlib has one such file) costs a U+FFFD, not the whole file. Empty files and records with
blank (whitespace-only) text are left out: they would only teach "bos then eos".
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from qkv.errors import UserError

# Bump when the way documents are read or split changes, so old caches are not reused.
CORPUS_FORMAT_VERSION = 2  # 2: blank (whitespace-only) documents are left out


def stdlib_files() -> list[Path]:
    """The running Python's standard-library `.py` files (no site-/dist-packages), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    excluded = {"site-packages", "dist-packages", "__pycache__"}
    return sorted(
        p
        for p in root.rglob("*.py")
        if p.is_file() and excluded.isdisjoint(p.relative_to(root).parts)
    )


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def resolve_files(path: str | None, what: str) -> tuple[Path, list[Path]]:
    """(root, sorted files) for a directory, a single file, or a glob pattern.

    Directories are walked recursively, skipping hidden entries (".git", ".cache", ...). The root
    is what document keys are relative to: the directory itself, or the deepest common folder.
    """
    if not path:
        raise UserError(f"{what} corpus needs a path: pass data.path=DIR or a glob of files")
    p = Path(path).expanduser()
    if p.is_dir():
        root = p.resolve()
        files = sorted(
            f for f in root.rglob("*") if f.is_file() and not _is_hidden(f, root)
        )
        if not files:
            raise UserError(f"corpus directory '{path}' has no files: put text files in it")
        return root, files
    if p.is_file():
        return p.resolve().parent, [p.resolve()]
    if glob.has_magic(str(p)):
        files = sorted(Path(f).resolve() for f in glob.glob(str(p), recursive=True))
        files = [f for f in files if f.is_file()]
        if not files:
            raise UserError(f"corpus glob '{path}' matches no files: check the pattern")
        root = Path(os.path.commonpath([f.parent for f in files]))
        return root, files
    raise FileNotFoundError(
        f"corpus path '{path}' does not exist: pass data.path=DIR or a glob of text files"
    )


def read_text_file(path: Path) -> str:
    """A file's text; invalid UTF-8 bytes become U+FFFD (see module docstring)."""
    return path.read_bytes().decode("utf-8", errors="replace")


def iter_jsonl(path: Path, text_field: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of each record; blank lines are skipped, bad ones raise."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError as e:
                raise UserError(
                    f"{path}:{lineno}: malformed JSON line ({e.__class__.__name__}): "
                    "fix or remove the line"
                ) from None
            if not isinstance(record, dict) or text_field not in record:
                raise UserError(
                    f"{path}:{lineno}: record has no field {text_field!r}: "
                    "set data.text_field to the field holding the text"
                )
            text = record[text_field]
            if not isinstance(text, str):
                raise UserError(
                    f"{path}:{lineno}: field {text_field!r} is {type(text).__name__}, not a "
                    "string: store the text as a JSON string"
                )
            yield lineno, text


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
    """What to build: the files of a local corpus and how to read and split them."""

    kind: str  # "stdlib" | "files" | "jsonl"
    root: Path
    files: tuple[Path, ...]
    text_field: str = "text"
    validation_fraction: float = 0.01

    def key(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def fingerprint(self) -> str:
        """Hash of everything that determines the built dataset (paths, sizes, mtimes, options)."""
        h = hashlib.sha256()
        header = {
            "format": CORPUS_FORMAT_VERSION,
            "kind": self.kind,
            "root": str(self.root),
            "text_field": self.text_field if self.kind == "jsonl" else None,
            "validation_fraction": self.validation_fraction,
        }
        h.update(json.dumps(header, sort_keys=True).encode())
        for f in self.files:
            st = f.stat()
            h.update(f"\0{f}\0{st.st_size}\0{st.st_mtime_ns}".encode())
        return h.hexdigest()

    def config_name(self) -> str:
        # TFDS keeps one directory per builder config: the fingerprint names it.
        return f"{self.kind}_{self.fingerprint()[:20]}"


def make_spec(
    kind: str, path: str | None, text_field: str, validation_fraction: float
) -> CorpusSpec:
    """Resolves a corpus description into a CorpusSpec (raises on a bad path or option)."""
    if not 0.0 < validation_fraction < 1.0:
        raise UserError(
            f"validation_fraction {validation_fraction} is out of range: use a value in (0, 1)"
        )
    if kind == "stdlib":
        files = stdlib_files()
        if not files:
            raise UserError("no standard-library .py files found: use kind='files' with a path")
        root = stdlib_root()
    elif kind in ("files", "jsonl"):
        root, files = resolve_files(path, kind)
    else:
        raise UserError(f"unknown corpus kind {kind!r}: use 'stdlib', 'files', 'jsonl' or 'tfds'")
    return CorpusSpec(kind, root, tuple(files), text_field, validation_fraction)


def unit_hash(key: str) -> float:
    """A key's position in [0, 1), uniform and stable across runs and machines."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


_unit_hash = unit_hash


def split_keys(keys: list[str], validation_fraction: float) -> tuple[list[str], list[str]]:
    """(train, validation) keys: a key goes to validation when its hash < fraction.

    With >= 2 documents each split gets at least one (the lowest-hash key is forced into
    validation, the highest into train), so small corpora still have a validation split.
    """
    if len(keys) < 2:
        raise UserError(
            f"corpus has {len(keys)} non-empty document(s) (whitespace-only ones do not count): need at "
            "least 2 to split train/validation by document; add files (or JSONL records)"
        )
    ranked = sorted(set(keys), key=lambda k: (_unit_hash(k), k))
    n_val = sum(_unit_hash(k) < validation_fraction for k in ranked)
    n_val = min(max(n_val, 1), len(ranked) - 1)
    return sorted(ranked[n_val:]), sorted(ranked[:n_val])


def document_keys(spec: CorpusSpec) -> list[str]:
    """Keys of the non-empty documents; for JSONL this reads (and validates) every line."""
    if spec.kind != "jsonl":
        return [spec.key(f) for f in spec.files if f.stat().st_size > 0 and read_text_file(f).strip()]
    keys = []
    for f in spec.files:
        for lineno, text in iter_jsonl(f, spec.text_field):
            if text.strip():
                keys.append(f"{spec.key(f)}:{lineno}")
    return keys


def iter_documents(spec: CorpusSpec, keys: set[str]) -> Iterator[tuple[str, str]]:
    """(key, text) of the documents whose key is in `keys`, in file order."""
    for f in spec.files:
        fkey = spec.key(f)
        if spec.kind != "jsonl":
            if fkey in keys:
                yield fkey, read_text_file(f)
            continue
        for lineno, text in iter_jsonl(f, spec.text_field):
            key = f"{fkey}:{lineno}"
            if key in keys:
                yield key, text
