"""SentencePiece tokenizer for code and text, with an exact round trip.

`train_tokenizer` trains a BPE/unigram/char model whose settings keep every byte of the input:
identity normalisation, no whitespace collapsing, no dummy prefix, byte fallback for characters the
vocabulary lacks, and "\n" as a user-defined piece. SentencePiece's trainer reads "sentences", so
documents are fed line by line (each line keeps its "\n"); very long lines are cut into pieces that
fit the trainer's sentence limit instead of being silently dropped by it.

`Tokenizer` is the one interface the rest of qkv uses (encode/decode, special ids, to_bytes/from_bytes);
`Tokenizer.load`/`from_bytes` pick the backend: `SentencePieceTokenizer` (here) or a Hugging Face
`tokenizer.json` through the `tokenizers` library (`qkv.data.hf_tokenizer.HFTokenizer`), told apart by
their bytes (a serialized proto, or JSON). `SentencePieceTokenizer` wraps a trained model. Its serialized
proto (`to_bytes`) is the whole tokenizer, so it can travel inside checkpoints. Special ids are fixed: pad=0, unk=1, bos=2, eos=3; tokenizers for
masked-language models (``with_mask=True``) add ``<mask>`` as id 4, a control piece that no text encodes to.

One SentencePiece quirk needs a workaround: it represents spaces with U+2581 ("▁"), so a literal
"▁" in the input would decode as a space. `Tokenizer.encode` therefore emits a literal "▁" as
its three UTF-8 byte pieces, which decode back to "▁" (byte pieces bypass the space mapping).
"""

from __future__ import annotations

import io
import os
import random
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm
from qkv.errors import UserError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MASK_ID, MASK_PIECE = 4, "<mask>"
MODEL_TYPES = ("bpe", "unigram", "char")

# SentencePiece's internal whitespace marker; a literal one in user text must not become a space.
_SPM_SPACE = "\u2581"
# The trainer skips sentences longer than this many bytes; we cut lines to fit (4 bytes/char max).
_MAX_SENTENCE_BYTES = 16384
_MAX_SENTENCE_CHARS = _MAX_SENTENCE_BYTES // 4
# The trained model depends on the trainer's thread count (seen with BPE: 1 vs 2 threads gave
# different models), so it is fixed rather than taken from the machine, for reproducibility.
_TRAIN_THREADS = 4


def _training_lines(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """Yields each text's lines (keeping "\n"), cutting long lines into <= max_chars pieces."""
    for text in texts:
        for line in text.splitlines(keepends=True):
            # splitlines also breaks on \r, \x0b, \x0c, \x1c-\x1e, \x85, \u2028, \u2029; that only
            # changes how the trainer counts, never what the model can encode.
            for start in range(0, len(line), max_chars):
                yield line[start : start + max_chars]


def _sample_lines(lines: Iterable[str], k: int, seed: int) -> list[str]:
    """A uniform sample of k lines (all of them if fewer), reproducible from the seed.

    Done here rather than by SentencePiece's own input_sentence_size sampling, whose result did
    not change with `set_random_generator_seed` in sentencepiece 0.2.3.
    """
    rng = random.Random(seed)
    sample: list[str] = []
    for i, line in enumerate(lines):
        if i < k:
            sample.append(line)
        else:
            j = rng.randrange(i + 1)  # reservoir sampling (Algorithm R)
            if j < k:
                sample[j] = line
    return sample


def train_tokenizer(
    texts: Iterable[str],
    model_prefix: str | Path,
    vocab_size: int = 8192,
    model_type: str = "bpe",
    max_sentences: int = 2_000_000,
    seed: int = 0,
    with_mask: bool = False,
) -> Path:
    """Trains a SentencePiece model on `texts`, writes `{model_prefix}.model`, returns its path.

    `max_sentences` caps how many lines the trainer sees (a uniform sample drawn with `seed`
    when the corpus has more). `vocab_size` is a soft limit: a small corpus yields a smaller
    vocabulary instead of an error. The same texts and seed give the same model bytes.
    `with_mask` reserves id 4 for ``<mask>`` (masked-language modelling).
    """
    if model_type not in MODEL_TYPES:
        raise UserError(
            f"tokenizer model_type {model_type!r} is not supported: use one of {MODEL_TYPES}"
        )
    if vocab_size < 300:
        # 4 specials + "\n" + 256 byte pieces must fit, with room for real pieces.
        raise UserError(f"tokenizer vocab_size {vocab_size} is too small: use at least 300")
    if max_sentences < 1:
        raise UserError(f"max_sentences={max_sentences}: use a positive number of lines")
    lines = (line for line in _training_lines(texts, _MAX_SENTENCE_CHARS) if line)
    sample = _sample_lines(lines, max_sentences, seed)
    if not sample:
        raise UserError("tokenizer corpus is empty: pass at least one non-empty text")

    spm.set_random_generator_seed(seed)
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sample),
        model_writer=writer,
        model_type=model_type,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        user_defined_symbols=["\n"],
        control_symbols=[MASK_PIECE] if with_mask else [],
        max_sentence_length=_MAX_SENTENCE_BYTES,
        input_sentence_size=0,  # already sampled above
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_piece="<pad>",
        unk_piece="<unk>",
        bos_piece="<s>",
        eos_piece="</s>",
        num_threads=_TRAIN_THREADS,
        minloglevel=2,
    )
    path = Path(f"{model_prefix}.model")
    _atomic_write(path, writer.getvalue())
    return path


def _atomic_write(path: Path, payload: bytes) -> None:
    """Writes bytes to a temp file beside `path`, then renames, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Tokenizer:
    """What qkv needs of a tokenizer, whichever backend: exact ``decode(encode(s)) == s``, special ids,
    and bytes that rebuild it (``to_bytes`` / ``from_bytes``) so it travels inside checkpoints."""

    backend = ""  # "sentencepiece" or "hf" (stored in a run's metadata)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """A SentencePiece ``.model``, a Hugging Face ``tokenizer.json``, or a directory holding either
        (tokenizer.json first; its special tokens come from the files beside it)."""
        path = Path(path).expanduser()
        if path.is_dir():
            found = [path / n for n in ("tokenizer.json", "tokenizer.model") if (path / n).is_file()]
            if not found:
                raise FileNotFoundError(f"{path} holds neither tokenizer.json nor tokenizer.model: pass a tokenizer file")
            path = found[0]
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer model '{path}' does not exist: train one with train_tokenizer "
                "or pass the path of a .model (SentencePiece) or tokenizer.json (Hugging Face) file"
            )
        if _is_json(path.read_bytes()[:64]):
            from .hf_tokenizer import HFTokenizer
            return HFTokenizer.load(path)
        try:
            return SentencePieceTokenizer(path.read_bytes())
        except (RuntimeError, IndexError, UserError) as err:  # sentencepiece cannot parse it (an empty file: an
            # IndexError from its empty vocabulary), or it lacks qkv's ids
            reason = str(err) if isinstance(err, UserError) else "it is not a SentencePiece model"
            raise UserError(f"tokenizer model '{path}' cannot be used: {reason}: pass a .model file written "
                            "by qkv tokenizer train (or by qkv pretrain, RUN_DIR/tokenizer.model) or a "
                            "tokenizer.json") from None

    @classmethod
    def from_bytes(cls, payload: bytes) -> Tokenizer:
        """Rebuilds a tokenizer from ``to_bytes`` of either backend (e.g. one stored in a checkpoint)."""
        if _is_json(payload[:64]):
            from .hf_tokenizer import HFTokenizer
            return HFTokenizer.from_bytes(payload)
        return SentencePieceTokenizer(payload)

    def to_bytes(self) -> bytes:
        raise NotImplementedError

    def save_for_hf(self, folder: Path) -> None:
        """Write the files a Hugging Face model directory carries for this tokenizer into ``folder``."""
        raise NotImplementedError

    vocab_size: int
    pad_id: int
    unk_id: int | None
    bos_id: int
    eos_id: int
    mask_id: int | None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def id_to_piece(self, token_id: int) -> str:
        raise NotImplementedError

    def piece_to_id(self, piece: str) -> int:
        raise NotImplementedError


def check_vocab(tok: Tokenizer, model_vocab: int) -> None:
    """Refuse a tokenizer with ids the model has no rows for (a smaller one, as with padded vocabularies, is fine)."""
    if tok.vocab_size > model_vocab:
        raise UserError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocabulary has only "
                        f"{model_vocab} rows (model.vocab_size): use the tokenizer the model was trained with, "
                        f"or one of at most {model_vocab} tokens")


def _is_json(head: bytes) -> bool:
    return head.lstrip()[:1] == b"{"


class SentencePieceTokenizer(Tokenizer):
    """A trained SentencePiece model with exact encode/decode and fixed special ids."""

    backend = "sentencepiece"

    def __init__(self, model_proto: bytes):
        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        self._check_specials()
        # Byte pieces that spell a literal "▁" (see module docstring).
        self._space_marker_ids = [
            self._sp.piece_to_id(f"<0x{b:02X}>") for b in _SPM_SPACE.encode("utf-8")
        ]
        self._skip_ids = frozenset({PAD_ID, BOS_ID, EOS_ID})

    def _check_specials(self) -> None:
        expected = {PAD_ID: "<pad>", UNK_ID: "<unk>", BOS_ID: "<s>", EOS_ID: "</s>"}
        found = {i: self._sp.id_to_piece(i) for i in expected}
        if found != expected or not self._sp.IsByte(self._sp.piece_to_id("<0x41>")):
            raise UserError(
                "tokenizer model lacks qkv's special ids or byte fallback "
                f"(found {found}): train it with qkv.data.train_tokenizer"
            )

    def to_bytes(self) -> bytes:
        """Returns the serialized model proto; `from_bytes` of it encodes identically."""
        return self._proto

    def save(self, path: str | Path) -> Path:
        """Writes the model proto to `path` atomically and returns the path."""
        path = Path(path)
        _atomic_write(path, self._proto)
        return path

    def save_for_hf(self, folder: Path) -> None:
        self.save(Path(folder) / "tokenizer.model")

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def unk_id(self) -> int:
        return UNK_ID

    @property
    def bos_id(self) -> int:
        return BOS_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def mask_id(self) -> int | None:
        """The ``<mask>`` id of a tokenizer trained ``with_mask``, else None."""
        return MASK_ID if self._sp.id_to_piece(MASK_ID) == MASK_PIECE else None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without bos/eos."""
        if _SPM_SPACE not in text:
            return self._sp.encode(text)
        ids: list[int] = []
        for i, part in enumerate(text.split(_SPM_SPACE)):
            if i:
                ids.extend(self._space_marker_ids)
            if part:
                ids.extend(self._sp.encode(part))
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of each text (one SentencePiece call when no text needs the "▁" workaround)."""
        texts = list(texts)
        if any(_SPM_SPACE in t for t in texts):
            return [self.encode(t) for t in texts]
        return self._sp.encode(texts)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, skipping pad/bos/eos; `decode(encode(s)) == s` for any str s."""
        kept = [int(i) for i in ids if int(i) not in self._skip_ids]
        return self._sp.decode(kept)

    def byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes of text each id stands for, int32 [vocab_size]: what bits per byte divide by.

        A byte-fallback piece is 1 byte, "▁" in a piece is a space (1 byte), "\n" is 1 byte, and the
        control ids (pad, unk, bos, eos, <mask>) are 0, so summing over the ids of ``encode(s)`` gives
        ``len(s.encode("utf-8"))`` exactly (unk never appears: unknown characters fall back to bytes).
        """
        sp = self._sp
        lengths = np.zeros(self.vocab_size, np.int32)
        for i in range(self.vocab_size):
            if sp.IsByte(i):
                lengths[i] = 1
            elif not (sp.IsControl(i) or sp.IsUnknown(i)):
                lengths[i] = len(sp.id_to_piece(i).replace(_SPM_SPACE, " ").encode("utf-8"))
        return lengths

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def piece_to_id(self, piece: str) -> int:
        return self._sp.piece_to_id(piece)

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer(vocab_size={self.vocab_size})"
