"""Compression baselines in bits per byte: Python's compressors agree with the gzip/bzip2/xz commands."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from qkv.tools.baselines import compression_bits_per_byte

TOOLS = {"gzip -9": ["gzip", "-9", "-n", "-c"], "bz2 -9": ["bzip2", "-9", "-c"], "xz -9": ["xz", "-9", "-c"]}


@pytest.mark.parametrize("name", list(TOOLS))
def test_matches_the_command_line_compressor_file_by_file(corpus, name):
    if shutil.which(TOOLS[name][0]) is None:
        pytest.skip(f"{TOOLS[name][0]} is not installed")
    files = sorted(corpus.glob("*.py"))[:6]
    texts = [f.read_text(encoding="utf-8") for f in files]
    total = sum(len(t.encode("utf-8")) for t in texts)
    compressed = sum(len(subprocess.run(TOOLS[name], input=t.encode("utf-8"), capture_output=True, check=True).stdout)
                     for t in texts)
    got = compression_bits_per_byte(texts)
    assert got["bytes"] == total
    # same formats and levels; GNU gzip's own deflate may differ from zlib's by a few bytes per file
    assert got[name] == pytest.approx(8 * compressed / total, rel=0.01)
    assert 1.0 < got[name] < 4.0


def test_each_document_is_compressed_alone():
    text = "def f(x):\n    return x * 2 + 1\n" * 20
    one, two = compression_bits_per_byte([text]), compression_bits_per_byte([text, text])
    for name in ("gzip -9", "bz2 -9", "xz -9"):
        assert two[name] == pytest.approx(one[name])  # a repeat in another document is not free
    with pytest.raises(ValueError, match="empty"):
        compression_bits_per_byte([""])
