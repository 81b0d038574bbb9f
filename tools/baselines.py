"""What general-purpose compressors achieve on a split, in bits per byte: the reference a language model's
bits per byte should beat.

Each document is compressed on its own (one file at a time, like ``gzip -9 FILE``), so no compressor
sees text from another document, as the model sees none at evaluation; headers are included.
"""
from __future__ import annotations

import bz2
import gzip
import lzma
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from qkv.errors import UserError

COMPRESSORS = {
    "gzip -9": lambda b: gzip.compress(b, compresslevel=9, mtime=0),
    "bz2 -9": lambda b: bz2.compress(b, compresslevel=9),
    "xz -9": lambda b: lzma.compress(b, preset=9),
}


def compression_bits_per_byte(texts: Iterable[str]) -> dict[str, float]:
    """{compressor: 8 · compressed bytes / UTF-8 bytes}, summed over the documents compressed one at a time;
    also ``"bytes"``, the UTF-8 bytes of all documents."""
    sizes = {name: 0 for name in COMPRESSORS}
    total = 0
    for text in texts:
        data = text.encode("utf-8")
        total += len(data)
        for name, compress in COMPRESSORS.items():
            sizes[name] += len(compress(data))
    if not total:
        raise UserError("the split is empty: there is nothing to compress")
    return {**{name: 8 * size / total for name, size in sizes.items()}, "bytes": float(total)}


def split_baselines(run_dir: str | Path, split: str = "validation", overrides: dict[str, Any] | None = None
                    ) -> dict[str, float]:
    """`compression_bits_per_byte` of every document of ``split`` of the run's text source."""
    from qkv.data import record_text
    from qkv.train import checkpoint
    from qkv.train.config import config_from_dict
    from qkv.train.tasks import task_for

    data = checkpoint.read_meta(run_dir)["config"]
    for section, values in (overrides or {}).items():
        data.setdefault(section, {}).update(values)
    cfg = config_from_dict(data)
    source = task_for(cfg).open(split)
    return compression_bits_per_byte(record_text(source[i]) for i in range(len(source)))
