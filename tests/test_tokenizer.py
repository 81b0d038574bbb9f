"""Tests for qkv.data.tokenizer: exact round trip on code and arbitrary Unicode, serialisation."""

from __future__ import annotations

import pytest

from qkv.data import Tokenizer, stdlib_files, train_tokenizer
from qkv.data.corpus import read_text_file

TRAIN_BYTES = 300_000


def _stdlib_slice(limit: int = TRAIN_BYTES) -> list[str]:
    texts, total = [], 0
    for path in stdlib_files()[::7]:  # a spread of modules, not just the first package
        text = read_text_file(path)
        texts.append(text)
        total += len(text)
        if total >= limit:
            break
    return texts


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return _stdlib_slice()


@pytest.fixture(scope="module")
def bpe_path(tmp_path_factory, corpus):
    # A 20k-character line exceeds SentencePiece's sentence limit: it must be cut, not crash.
    long_line = "x = [" + ", ".join(str(i) for i in range(4000)) + "]\n"
    return train_tokenizer(corpus + [long_line], tmp_path_factory.mktemp("tok") / "bpe",
                           vocab_size=800)


@pytest.fixture(scope="module")
def tok(bpe_path) -> Tokenizer:
    return Tokenizer.load(bpe_path)


ROUND_TRIP_CASES = {
    "python": "class A:\n    def f(self, x):\n        if x:\n            return x  # ok\n\n\n",
    "tabs": "def g():\n\tif True:\n\t\treturn 1\n\t \t\n",
    "blank_lines": "\n\n\na\n\n\n\nb\n",
    "trailing_spaces": "x = 1   \ny = 2 \t \n   \n",
    "crlf": "line one\r\nline two\r\n\r\nend",
    "lone_cr": "a\rb\r",
    "emoji_cjk": "print('héllo 👋 世界 🇫🇷 👨‍👩‍👧')\n",
    "combining": "e\u0301 a\u0308 n\u0303 \u0915\u094d\u0937",
    "whitespace_only": "   \t \n  ",
    "single_space": " ",
    "empty": "",
    "leading_space": "  leading and trailing  ",
    "control_chars": "\x00\x01\x0b\x0c\x1b\x7f",
    "spm_space_marker": "a\u2581b \u2581 \u2581\u2581",
    "special_piece_text": "<s> </s> <pad> <unk> <0x41> \u2047",
    "unicode_line_seps": "a\u2028b\u2029c\x85d",
    "digits": "3.14159 1e-10 0xFF 1_000_000",
    "long_indent": " " * 40 + "deep()\n",
}


@pytest.mark.parametrize("name", sorted(ROUND_TRIP_CASES))
def test_exact_round_trip(tok, name):
    text = ROUND_TRIP_CASES[name]
    assert tok.decode(tok.encode(text)) == text


def test_round_trip_unseen_characters_use_byte_fallback(tok, corpus):
    seen = set("".join(corpus))
    text = "\U0001f9ec \U0001d518\U0001d52b ᚠᛇᚻ ꙮ \U00010348"
    assert not set(text.replace(" ", "")) & seen, "test text must be unseen in training"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.unk_id not in ids
    assert any(tok.id_to_piece(i).startswith("<0x") for i in ids)


def test_round_trip_stdlib_files_outside_training(tok):
    held_out = [read_text_file(p) for p in stdlib_files()[3::97][:15]]
    for text in held_out:
        assert tok.decode(tok.encode(text)) == text
    # Whitespace-only pieces and "\n" make code compress well even with a tiny vocabulary.
    n_chars = sum(map(len, held_out))
    n_tokens = sum(len(tok.encode(t)) for t in held_out)
    assert n_chars / n_tokens > 1.5  # ~1.9 with 800 pieces; ~3.2 with 8k on the full stdlib


def test_newline_and_indent_pieces(tok):
    assert tok.encode("\n") == [tok.piece_to_id("\n")]
    assert len(tok.encode("        ")) <= 2  # eight spaces are whitespace-only pieces


def test_special_ids(tok):
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert [tok.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
    ids = tok.encode("hello world")
    assert not {0, 1, 2, 3} & set(ids)
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id, tok.pad_id]) == "hello world"
    assert 500 < tok.vocab_size <= 800


def test_bytes_round_trip_and_save(tok, tmp_path):
    again = Tokenizer.from_bytes(tok.to_bytes())
    text = ROUND_TRIP_CASES["python"] + ROUND_TRIP_CASES["emoji_cjk"]
    assert again.encode(text) == tok.encode(text)
    assert again.to_bytes() == tok.to_bytes()
    path = tok.save(tmp_path / "copy.model")
    assert Tokenizer.load(path).encode(text) == tok.encode(text)
    assert not list(tmp_path.glob("*.tmp"))


def test_encode_batch_matches_encode(tok):
    texts = list(ROUND_TRIP_CASES.values())
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    plain = [t for t in texts if "\u2581" not in t]
    assert tok.encode_batch(plain) == [tok.encode(t) for t in plain]


def test_training_is_deterministic(tmp_path, corpus):
    small = corpus[:3]

    def train(name, seed, max_sentences=2_000_000):
        return train_tokenizer(small, tmp_path / name, vocab_size=400, seed=seed,
                               max_sentences=max_sentences).read_bytes()

    assert train("a", 1) == train("b", 1)
    # When lines are sampled, the seed picks the sample, reproducibly.
    assert train("c", 1, 500) == train("d", 1, 500) != train("e", 2, 500)


@pytest.mark.parametrize("model_type", ["unigram", "char"])
def test_other_model_types(tmp_path, corpus, model_type):
    path = train_tokenizer(corpus[:3], tmp_path / model_type, vocab_size=600,
                           model_type=model_type)
    tok = Tokenizer.load(path)
    for text in ROUND_TRIP_CASES.values():
        assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("texts", [[], ["", ""]])
def test_empty_corpus_raises(tmp_path, texts):
    with pytest.raises(ValueError, match="corpus is empty"):
        train_tokenizer(texts, tmp_path / "empty")
    assert not (tmp_path / "empty.model").exists()


def test_bad_arguments_raise(tmp_path, corpus):
    with pytest.raises(ValueError, match="model_type"):
        train_tokenizer(corpus[:1], tmp_path / "w", model_type="wordpiece")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.load(tmp_path / "missing.model")


def test_mask_piece_for_masked_language_models(tmp_path, corpus, tok):
    masked = Tokenizer.load(train_tokenizer(corpus[:50], tmp_path / "mlm", vocab_size=400, with_mask=True))
    assert masked.mask_id == 4 and masked.id_to_piece(4) == "<mask>" and tok.mask_id is None
    text = "x = '<mask>'\n\tpass\n"
    ids = masked.encode(text)
    assert 4 not in ids and masked.decode(ids) == text  # no text encodes to it; round trip stays exact
    assert masked.decode(ids[:3] + [4] + ids[3:]) == text  # and decoding skips it
    assert masked.encode("\n") == [5]  # the newline piece moves up by one


def test_byte_lengths_sum_to_utf8_length(tmp_path, corpus, tok):
    """Summed over the ids of any text, the byte-length table gives the text's UTF-8 length (bits per byte
    divide by it): byte pieces count 1, "▁" counts as a space, specials count 0."""
    masked = Tokenizer.load(train_tokenizer(corpus[:50], tmp_path / "mlm", vocab_size=400, with_mask=True))
    char = Tokenizer.load(train_tokenizer(corpus[:3], tmp_path / "char", vocab_size=600, model_type="char"))
    for t in (tok, masked, char):
        lengths = t.byte_lengths()
        assert lengths.shape == (t.vocab_size,)
        assert lengths[[t.pad_id, t.unk_id, t.bos_id, t.eos_id]].tolist() == [0, 0, 0, 0]
        for text in [*ROUND_TRIP_CASES.values(), corpus[1][:5000]]:
            assert int(lengths[t.encode(text)].sum()) == len(text.encode("utf-8")), text[:40]
    assert masked.byte_lengths()[4] == 0  # <mask>
    assert tok.byte_lengths()[tok.piece_to_id("<0xE2>")] == 1
