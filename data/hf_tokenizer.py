"""Hugging Face ``tokenizer.json`` (GPT-2, Llama 3, ...) as a qkv tokenizer, through the ``tokenizers`` library.

A tokenizer.json alone does not say which of its special tokens begins or ends a text; Hugging Face keeps that
in the files beside it. `HFTokenizer.load` reads them in this order: ``tokenizer_config.json`` (``bos_token``,
``eos_token``, ``pad_token``, ``unk_token``), then ``generation_config.json`` and ``config.json``
(``*_token_id``; a list of eos ids gives its first), then the usual spellings among the special tokens
(``<s>``, ``<|begin_of_text|>``, ``<|endoftext|>``, ...). A tokenizer without a pad token pads with eos and
one without bos starts prompts with eos (GPT-2's convention). `to_bytes` stores the tokenizer.json text
together with the resolved ids, so a checkpoint needs no side files.

Exactness: ``encode`` adds no special tokens and reads special-token spellings in the text as plain text
(``encode_special_tokens``), like SentencePiece's control pieces, so ``decode(encode(s)) == s`` for a
byte-level tokenizer and any str s; ``decode`` drops pad/bos/eos ids as the SentencePiece backend does.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .tokenizer import Tokenizer
from qkv.errors import UserError

FORMAT = "qkv-hf-tokenizer/1"
SPECIALS = ("bos", "eos", "pad", "unk")
# Spellings tried, in order, when no side file names a special token.
_USUAL = {"bos": ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "<|endoftext|>"),
          "eos": ("</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>", "<|im_end|>"),
          "pad": ("<pad>", "<|pad|>", "[PAD]"), "unk": ("<unk>", "[UNK]")}


def _first_id(value: Any) -> int | None:
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({str(err).splitlines()[0]}): fix or remove it") from None
    return data if isinstance(data, dict) else {}


class HFTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` behind qkv's Tokenizer interface."""

    backend = "hf"

    def __init__(self, tokenizer_json: str, special_ids: dict[str, int | None]):
        from tokenizers import Tokenizer as RustTokenizer

        self._json = tokenizer_json
        try:
            self._tok = RustTokenizer.from_str(tokenizer_json)
        except Exception as err:  # the Rust side raises its own exception type
            raise UserError(f"not a Hugging Face tokenizer.json ({str(err).splitlines()[0]}): pass the "
                            "tokenizer.json of a Hugging Face model") from None
        self._tok.encode_special_tokens = True
        self._tok_specials = None  # the same tokenizer reading special tokens (encode_with_offsets)
        ids = dict(special_ids)
        if ids.get("eos") is None:
            raise UserError("the tokenizer.json names no end-of-text token: add \"eos_token\" to the "
                            "tokenizer_config.json beside it")
        ids["bos"] = ids["eos"] if ids.get("bos") is None else ids["bos"]
        ids["pad"] = ids["eos"] if ids.get("pad") is None else ids["pad"]
        for name, value in ids.items():
            if value is not None and not 0 <= value < self.vocab_size:
                raise UserError(f"the tokenizer's {name} id {value} is outside its vocabulary of {self.vocab_size}")
        self._ids = {name: ids.get(name) for name in SPECIALS}
        self._skip_ids = frozenset({self.pad_id, self.bos_id, self.eos_id})

    @classmethod
    def load(cls, path: str | Path) -> "HFTokenizer":
        """A tokenizer.json and the special tokens named by the Hugging Face files beside it."""
        path = Path(path).expanduser()
        text = path.read_text()
        ids = resolve_special_ids(json.loads(text), path.parent)
        return cls(text, ids)

    @classmethod
    def from_bytes(cls, payload: bytes) -> "HFTokenizer":
        """``to_bytes`` of an HFTokenizer, or the bytes of a bare tokenizer.json (specials by their usual names)."""
        data = json.loads(payload.decode("utf-8"))
        if data.get("format") == FORMAT:
            return cls(data["tokenizer_json"], data["special_ids"])
        return cls(payload.decode("utf-8"), resolve_special_ids(data, None))

    def to_bytes(self) -> bytes:
        return json.dumps({"format": FORMAT, "special_ids": self._ids, "tokenizer_json": self._json}).encode()

    def save_for_hf(self, folder: Path) -> None:
        """tokenizer.json + a tokenizer_config.json naming its special tokens (what AutoTokenizer reads)."""
        folder = Path(folder)
        (folder / "tokenizer.json").write_text(self._json)
        config = {"tokenizer_class": "PreTrainedTokenizerFast"}
        for name in SPECIALS:
            if self._ids[name] is not None:
                config[f"{name}_token"] = self.id_to_piece(self._ids[name])
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return self._ids["pad"]

    @property
    def unk_id(self) -> int | None:
        return self._ids["unk"]

    @property
    def bos_id(self) -> int:
        return self._ids["bos"]

    @property
    def eos_id(self) -> int:
        return self._ids["eos"]

    @property
    def mask_id(self) -> None:
        return None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without bos/eos."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, character offsets) of `text` with special-token spellings read as special tokens and no
        bos/eos added: how rendered chat templates are tokenized (transformers' ``add_special_tokens=False``)."""
        if self._tok_specials is None:
            from tokenizers import Tokenizer as RustTokenizer
            self._tok_specials = RustTokenizer.from_str(self._json)
        encoding = self._tok_specials.encode(text, add_special_tokens=False)
        return list(encoding.ids), [tuple(o) for o in encoding.offsets]

    def special_affixes(self) -> tuple[list[int], list[int]]:
        """(ids before, ids after) a text that the tokenizer.json's post-processor adds, which is what
        transformers' ``encode`` adds by default (``add_special_tokens=True``): Llama 3's ``<|begin_of_text|>``
        before, nothing for GPT-2."""
        self.encode_with_offsets("")  # builds the tokenizer that reads special tokens
        bare = self._tok_specials.encode("a", add_special_tokens=False).ids
        full = self._tok_specials.encode("a", add_special_tokens=True).ids
        start = next((i for i in range(len(full) - len(bare) + 1) if full[i:i + len(bare)] == bare), 0)
        return full[:start], full[start + len(bare):]

    def added_special_ids(self) -> set[int]:
        """Ids of the added tokens marked special (<|eot_id|>, <|im_end|>, <end_of_turn>, ...)."""
        return {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, skipping pad/bos/eos."""
        return self._tok.decode([int(i) for i in ids if int(i) not in self._skip_ids], skip_special_tokens=False)

    def id_to_piece(self, token_id: int) -> str:
        return self._tok.id_to_token(int(token_id))

    def byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes of text each id stands for, int32 [vocab_size] (what bits per byte divide by).

        Byte-level BPE pieces spell one byte per character (GPT-2's byte-to-unicode table); any other piece
        counts the bytes of its decoded text. Special tokens (bos, eos, pad, added specials) are 0."""
        byte_chars = set(_bytes_to_unicode())
        specials = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        specials |= {i for i in (self.pad_id, self.bos_id, self.eos_id, self.unk_id) if i is not None}
        lengths = np.zeros(self.vocab_size, np.int32)
        for i in range(self.vocab_size):
            piece = self._tok.id_to_token(i)
            if i in specials or piece is None:
                continue
            lengths[i] = len(piece) if all(c in byte_chars for c in piece) else \
                len(self._tok.decode([i], skip_special_tokens=False).encode("utf-8"))
        return lengths

    def piece_to_id(self, piece: str) -> int:
        token_id = self._tok.token_to_id(piece)
        return self.unk_id if token_id is None else token_id

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id})"


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte, character -> byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    shifted = [b for b in range(256) if b not in keep]
    table = {chr(b): b for b in keep}
    table.update({chr(256 + n): b for n, b in enumerate(shifted)})
    return table


def resolve_special_ids(tokenizer_json: dict[str, Any], folder: Path | None) -> dict[str, int | None]:
    """bos/eos/pad/unk ids of a tokenizer.json: from the Hugging Face files in ``folder``, else usual names."""
    vocab = dict(tokenizer_json.get("model", {}).get("vocab") or {}) if isinstance(
        tokenizer_json.get("model", {}).get("vocab"), dict) else {}
    special = {t["content"]: t["id"] for t in tokenizer_json.get("added_tokens", []) if t.get("special")}
    known = {**vocab, **{t["content"]: t["id"] for t in tokenizer_json.get("added_tokens", [])}}
    ids: dict[str, int | None] = dict.fromkeys(SPECIALS)
    if folder is not None:
        tok_config = _read_json(folder / "tokenizer_config.json")
        for name in SPECIALS:
            token = tok_config.get(f"{name}_token")
            token = token.get("content") if isinstance(token, dict) else token
            if isinstance(token, str) and token in known:
                ids[name] = known[token]
        for side in ("generation_config.json", "config.json"):
            config = _read_json(folder / side)
            for name in SPECIALS:
                if ids[name] is None:
                    ids[name] = _first_id(config.get(f"{name}_token_id"))
    for name in SPECIALS:
        if ids[name] is None:
            ids[name] = next((special[t] for t in _USUAL[name] if t in special), None)
    return ids
