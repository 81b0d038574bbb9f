"""Tests for seq2seq (parallel text) and classification data: sources, errors, batches, resumption."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath

from qkv.data import (CLASSIFY_BATCH_KEYS, SEQ2SEQ_BATCH_KEYS, ClassifyIterator, DataError, LabeledText,
                      Pair, PairTexts, Seq2SeqIterator, Tokenizer, classify_eval_batches, classify_examples,
                      infer_labels, load_pairs, number_to_words, read_labeled, seq2seq_eval_batches, tfds_labeled,
                      tfds_pairs, tokenize_pairs, toy_pairs, toy_split, train_tokenizer)

BOS, EOS = 2, 3


def char_encode(text: str) -> list[int]:
    return [ord(c) for c in text]


def char_decode(ids) -> str:
    return "".join(chr(i) for i in ids)


def one_line_error(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


# ------------------------------------------------------------------------------------------ toy task

def test_number_words():
    cases = {0: "zero", 7: "seven", 15: "fifteen", 20: "twenty", 90: "ninety", 21: "twenty-one",
             100: "one hundred", 105: "one hundred five", 340: "three hundred forty", 1000: "one thousand",
             4721: "four thousand seven hundred twenty-one", 10_000: "ten thousand",
             20_020: "twenty thousand twenty", 99_999: "ninety-nine thousand nine hundred ninety-nine"}
    assert {n: number_to_words(n) for n in cases} == cases
    with pytest.raises(ValueError, match="0 .. 999999"):
        number_to_words(1_000_000)


def test_toy_splits_are_disjoint_stable_and_held_out():
    splits = {s: toy_pairs(s) for s in ("train", "validation", "test")}
    numbers = {s: [int(src) for src, _ in pairs] for s, pairs in splits.items()}
    assert sorted(sum(numbers.values(), [])) == list(range(10_000))  # every number once: disjoint, complete
    assert [len(numbers[s]) for s in splits] == [9_029, 487, 484]  # ~90/5/5 %, pinned: the hash is fixed
    assert toy_pairs("test") == splits["test"]  # deterministic
    assert [toy_split(n) for n in (23, 53, 0, 1)] == ["test", "test", "train", "train"]  # a fixed hash
    assert set(toy_pairs("test", limit=2_000)) == {p for p in splits["test"] if int(p[0]) < 2_000}
    words = dict(sum(splits.values(), []))
    assert words["4721"] == "four thousand seven hundred twenty-one" and words["0"] == "zero"
    assert splits["test"][0].where == "toy:test:23"
    with pytest.raises(ValueError, match="split 'dev' does not exist"):
        toy_pairs("dev")


# --------------------------------------------------------------------------------------- local files

def test_load_pairs_tsv_jsonl_and_two_files(tmp_path):
    (tmp_path / "train.tsv").write_text("ein Haus\ta house\n\nzwei\ttwo\r\n")
    (tmp_path / "train.jsonl").write_text('{"de": "ein Haus", "en": "a house"}\n\n{"de": "zwei", "en": "two"}\n')
    (tmp_path / "train.de").write_text("ein Haus\nzwei\n\n \n")
    (tmp_path / "train.en").write_text("a house\ntwo\n")
    want = [("ein Haus", "a house"), ("zwei", "two")]
    tsv = load_pairs(str(tmp_path / "{split}.tsv"), "train")
    assert tsv == want and [p.where for p in tsv] == [f"{tmp_path}/train.tsv:1", f"{tmp_path}/train.tsv:3"]
    jsonl = load_pairs(str(tmp_path / "train.jsonl"), source_field="de", target_field="en")
    assert jsonl == want and jsonl[1].where.endswith("train.jsonl:3")
    two = load_pairs(str(tmp_path / "{split}.de"), "train", target_path=str(tmp_path / "{split}.en"))
    assert two == want and two[1].where.endswith("train.de:2") and two[0].source == "ein Haus"
    assert list(PairTexts(two)) == ["ein Haus", "a house", "zwei", "two"]
    (tmp_path / "more.txt").write_text("drei\tthree\n")
    assert load_pairs(str(tmp_path / "more.txt"), kind="tsv") == [("drei", "three")]


PAIR_ERRORS = [  # (files, load_pairs kwargs, message pattern)
    ({"a.de": "x\ny\nz\n", "a.en": "X\nY\n\n"}, {"path": "a.de", "target_path": "a.en"},
     r"a\.de has 3 lines but .*a\.en has 2 .*line-aligned"),
    ({"a.de": "x\n \nz\n", "a.en": "X\nY\nZ\n"}, {"path": "a.de", "target_path": "a.en"},
     r"a\.de:2: empty source line"),
    ({"a.de": "x\ny\nz\n", "a.en": "X\n\t\nZ\n"}, {"path": "a.de", "target_path": "a.en"}, r"a\.en:2: empty target line"),
    ({"a.tsv": "x\tX\nno tab here\n"}, {"path": "a.tsv"}, r"a\.tsv:2: expected source<TAB>target .*found 0 tabs"),
    ({"a.tsv": "x\tX\ty\n"}, {"path": "a.tsv"}, r"a\.tsv:1: expected source<TAB>target .*found 2 tabs"),
    ({"a.tsv": "x\tX\n\ny\t \n"}, {"path": "a.tsv"}, r"a\.tsv:3: empty target"),
    ({"a.jsonl": '{"source": "x", "target": "X"}\n{"source": "y"\n'}, {"path": "a.jsonl"},
     r"a\.jsonl:2: not valid JSON"),
    ({"a.jsonl": '{"source": "x", "tgt": "X"}\n'}, {"path": "a.jsonl"}, r"a\.jsonl:1: missing field 'target'"),
    ({"a.jsonl": '{"source": "", "target": "X"}\n'}, {"path": "a.jsonl"}, r"a\.jsonl:1: field 'source' is empty"),
    ({"a.csv": "x,X\n"}, {"path": "a.csv"}, r"cannot tell the format of 'a\.csv'.*\.tsv or \.jsonl"),
    ({"a.tsv": "\n\n"}, {"path": "a.tsv"}, r"no pairs found"),
]


@pytest.mark.parametrize("files,kwargs,message", PAIR_ERRORS, ids=[m for _, _, m in PAIR_ERRORS])
def test_load_pairs_errors_name_file_and_line(tmp_path, files, kwargs, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    kwargs = {k: str(tmp_path / v) for k, v in kwargs.items()}
    with pytest.raises(DataError) as err:
        load_pairs(**kwargs)
    assert re.search(message, one_line_error(err)), err.value


def test_load_pairs_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no TSV file matches"):
        load_pairs(str(tmp_path / "nope.tsv"))
    with pytest.raises(FileNotFoundError, match="target file .* does not exist"):
        (tmp_path / "a.de").write_text("x\n")
        load_pairs(str(tmp_path / "a.de"), target_path=str(tmp_path / "a.en"))
    with pytest.raises(ValueError, match="no split was given"):
        load_pairs(str(tmp_path / "{split}.tsv"))


# ------------------------------------------------------------------------------ tokens and batches

@pytest.fixture(scope="module")
def toy_tok(tmp_path_factory) -> Tokenizer:
    texts = list(PairTexts(toy_pairs("train")))
    model = train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "toy", vocab_size=320, model_type="bpe")
    return Tokenizer.load(model)


def _segments(batch: dict[str, np.ndarray], r: int, prefix: str = "") -> dict[int, np.ndarray]:
    seg = batch[prefix + "segment_ids"][r]
    return {s: np.flatnonzero(seg == s) for s in sorted(set(seg.tolist()) - {0})}


def _check_seq2seq_batch(batch, src_len, tgt_len, batch_size, by_text, tok) -> list:
    """Checks the contract of one batch and returns its (source, target) texts, row by row."""
    assert set(batch) == set(SEQ2SEQ_BATCH_KEYS)
    for k, v in batch.items():
        width = src_len if k.startswith("src_") else tgt_len
        assert v.dtype == np.int32 and v.shape == (batch_size, width), k
    rows = []
    for r in range(batch_size):
        src_segs, tgt_segs = _segments(batch, r, "src_"), _segments(batch, r)
        assert list(src_segs) == list(tgt_segs) == list(range(1, len(src_segs) + 1))  # same segments, in order
        row = []
        for s in src_segs:
            scols, tcols = src_segs[s], tgt_segs[s]
            for cols in (scols, tcols):  # contiguous, positions restart at 0
                assert (np.diff(cols) == 1).all()
            assert batch["src_positions"][r, scols].tolist() == list(range(len(scols)))
            assert batch["positions"][r, tcols].tolist() == list(range(len(tcols)))
            source, inputs, targets = (batch["src_inputs"][r, scols], batch["inputs"][r, tcols],
                                       batch["targets"][r, tcols])
            assert source[-1] == EOS and inputs[0] == BOS and targets[-1] == EOS
            assert inputs[1:].tolist() == targets[:-1].tolist()  # decoder inputs = targets shifted right
            pair = (tok.decode(source), tok.decode(targets))
            assert by_text[pair[0]] == pair[1]  # the whole example, unsplit
            row.append(pair)
        assert (batch["loss_mask"][r] == (batch["segment_ids"][r] > 0)).all()
        for k in ("src_inputs", "src_positions"):
            assert (batch[k][r][batch["src_segment_ids"][r] == 0] == 0).all()
        for k in ("inputs", "targets", "positions"):
            assert (batch[k][r][batch["segment_ids"][r] == 0] == 0).all()
        rows.append(row)
    return rows


def test_seq2seq_packing_with_a_real_tokenizer(toy_tok):
    pairs = toy_pairs("train")[:600]
    data = tokenize_pairs(pairs, toy_tok.encode, bos_id=toy_tok.bos_id, eos_id=toy_tok.eos_id, src_len=16,
                          tgt_len=24)
    assert (toy_tok.bos_id, toy_tok.eos_id) == (BOS, EOS) and len(data.items) == 600 and data.skipped == 0
    for (src, tgt), ex in zip(pairs[:20], data.items):
        assert ex.source.tolist() == toy_tok.encode(src) + [EOS] and ex.where == f"toy:train:{src}"
        assert ex.inputs.tolist() == [BOS, *toy_tok.encode(tgt)] and ex.targets.tolist() == [*toy_tok.encode(tgt), EOS]
    by_text = dict(pairs)
    it = Seq2SeqIterator(data.items, src_len=16, tgt_len=24, batch_size=4, seed=1)
    seen, multi = 0, 0
    for _ in range(12):
        batch = next(it)
        rows = _check_seq2seq_batch(batch, 16, 24, 4, by_text, toy_tok)
        seen += sum(map(len, rows))
        multi += sum(len(row) > 1 for row in rows)
        for r in range(3):  # a row is closed only when the next example does not fit
            nxt_src = len(_segments(batch, r + 1, "src_")[1])
            nxt_tgt = len(_segments(batch, r + 1)[1])
            used_src, used_tgt = (batch["src_segment_ids"][r] > 0).sum(), (batch["segment_ids"][r] > 0).sum()
            assert used_src + nxt_src > 16 or used_tgt + nxt_tgt > 24
    assert multi > 0 and seen > 4 * 12


def test_seq2seq_epochs_resume_and_eval():
    pairs = [(f"s{i}" * (1 + i % 3), f"t{i}" * (1 + i % 4)) for i in range(23)]
    data = tokenize_pairs(pairs, char_encode, bos_id=BOS, eos_id=EOS, src_len=12, tgt_len=14)
    it = Seq2SeqIterator(data.items, src_len=12, tgt_len=14, batch_size=3, seed=5)
    texts = []
    while it.get_state()["epoch"] == 0:
        b = next(it)
        texts += [char_decode(b["src_inputs"][r, cols][:-1]) for r in range(3)
                  for cols in _segments(b, r, "src_").values()]
    first_epoch = texts[:len(pairs)]
    assert sorted(first_epoch) == sorted(s for s, _ in pairs) and first_epoch != [s for s, _ in pairs]
    saved = json.loads(json.dumps(it.get_state()))
    assert set(saved) == {"epoch", "next", "examples"}
    want = [next(it) for _ in range(4)]
    again = Seq2SeqIterator(data.items, src_len=12, tgt_len=14, batch_size=3, seed=5)
    again.set_state(saved)
    for w in want:
        got = next(again)
        assert all((got[k] == w[k]).all() for k in SEQ2SEQ_BATCH_KEYS)
    first = [next(Seq2SeqIterator(data.items, src_len=12, tgt_len=14, batch_size=3, seed=seed))["src_inputs"]
             for seed in (5, 5, 6)]
    assert (first[0] == first[1]).all() and not (first[0] == first[2]).all()
    with pytest.raises(ValueError, match="for 23 examples, the data now has 22"):
        Seq2SeqIterator(data.items[:-1], src_len=12, tgt_len=14, batch_size=3, seed=5).set_state(saved)
    # Evaluation: one ordered pass, each example once, the last batch padded; shards split the examples.
    shards = [seq2seq_eval_batches(data.items, src_len=12, tgt_len=14, batch_size=3, shard_index=i, shard_count=2)
              for i in range(2)]
    for i, batches in enumerate(shards):
        got = [char_decode(b["src_inputs"][r, cols][:-1]) for b in batches for r in range(3)
               for cols in _segments(b, r, "src_").values()]
        assert got == [s for s, _ in pairs[i::2]]
        filled = [bool(_segments(b, r)) for b in batches for r in range(3)]
        assert filled == sorted(filled, reverse=True) and len(filled) - sum(filled) < 3  # only the tail is padding
    assert len(seq2seq_eval_batches(data.items, src_len=12, tgt_len=14, batch_size=3, max_batches=2)) == 2
    assert seq2seq_eval_batches(data.items[:1], src_len=12, tgt_len=14, batch_size=3, shard_index=1,
                                shard_count=2) == []


def test_seq2seq_overlong_and_empty_pairs():
    pairs = [("short", "kurz"), ("a much longer source", "x"), ("y", "a much longer target")]
    with pytest.raises(DataError) as err:
        tokenize_pairs(pairs, char_encode, bos_id=BOS, eos_id=EOS, src_len=10, tgt_len=10)
    assert one_line_error(err).startswith("pair 1: the pair has 21 source tokens") and "overlong='skip'" in str(
        err.value)
    data = tokenize_pairs(pairs, char_encode, bos_id=BOS, eos_id=EOS, src_len=10, tgt_len=10, overlong="skip")
    assert len(data.items) == 1 and data.skipped == 2
    assert tokenize_pairs(pairs[:1], char_encode, bos_id=BOS, eos_id=EOS, src_len=6, tgt_len=5).items  # exact fit
    with pytest.raises(DataError, match="pair 0: the pair has 6 source tokens .* and 5 target"):
        tokenize_pairs(pairs[:1], char_encode, bos_id=BOS, eos_id=EOS, src_len=6, tgt_len=4)
    with pytest.raises(DataError, match=r"here:3: empty target.*empty='skip'"):
        tokenize_pairs([Pair("a", "b", "here:2"), Pair("a", " ", "here:3")], char_encode, bos_id=BOS, eos_id=EOS,
                       src_len=9, tgt_len=9)


# -------------------------------------------------------------------------------------------- TFDS

class QkvToyTranslate(tfds.core.GeneratorBasedBuilder):
    """A stand-in for wmt14_translate/de-en: a Translation feature {"de", "en"} (one empty pair)."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="de-en")]
    code_path = epath.Path(__file__)  # see data/text_builder.py

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.Translation(languages=["de", "en"]))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(6), "validation": self._generate_examples(2)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"de": f"Satz {i} \u00fc" if i != 4 else "", "en": f"sentence {i}"}


def test_tfds_translation_pairs(tmp_path):
    dd = tmp_path / "dd"
    with pytest.raises(ValueError, match=r"not prepared.*tfds build qkv_toy_translate/de-en --file_format=array_record"):
        tfds_pairs("qkv_toy_translate/de-en", "train", dd, "de", "en")
    QkvToyTranslate(data_dir=dd, config="de-en").download_and_prepare(file_format="array_record")
    pairs = tfds_pairs("qkv_toy_translate/de-en", "validation", dd, "de", "en")
    assert len(pairs) == 2 and sorted(pairs) == [("Satz 0 \u00fc", "sentence 0"), ("Satz 1 \u00fc", "sentence 1")]
    assert pairs[0].where == "tfds:qkv_toy_translate/de-en:validation[0]" and isinstance(pairs[1][0], str)
    reverse = tfds_pairs("qkv_toy_translate/de-en", "train", dd, "en", "de")
    assert sorted(reverse)[0] == ("sentence 0", "Satz 0 \u00fc")
    with pytest.raises(DataError, match=r"tfds:qkv_toy_translate/de-en:train\[\d\]: empty target"):
        tokenize_pairs(reverse, char_encode, bos_id=BOS, eos_id=EOS, src_len=20, tgt_len=20)
    data = tokenize_pairs(reverse, char_encode, bos_id=BOS, eos_id=EOS, src_len=20, tgt_len=20, empty="skip")
    assert len(data.items) == 5 and data.empty == 1
    with pytest.raises(ValueError, match=r"has no feature 'fr' \(features: \['de', 'en'\]\): set source_lang"):
        tfds_pairs("qkv_toy_translate/de-en", "train", dd, "fr", "en")
    with pytest.raises(ValueError, match="split 'test' does not exist"):
        tfds_pairs("qkv_toy_translate/de-en", "test", dd, "de", "en")
    with pytest.raises(ValueError, match="not in the TFDS catalog"):
        tfds_pairs("qkv_no_such_translate", "train", dd, "de", "en")


# ---------------------------------------------------------------------------------- classification

def _write(path: Path, records: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def test_classify_labels_inferred_explicit_and_bad(tmp_path):
    ints = read_labeled(_write(tmp_path / "i.jsonl", [{"text": "a", "label": 2}, "", {"text": "b", "label": 0},
                                                      {"text": "c", "label": 2}]))
    assert infer_labels(ints) == [0, 2] and ints[2].where.endswith("i.jsonl:4")
    data = classify_examples(ints, char_encode, bos_id=BOS, eos_id=EOS, seq_len=8)
    assert data.labels == [0, 2] and [ex.label for ex in data.items] == [1, 0, 1] and data.counts() == {0: 1, 2: 2}
    strs = read_labeled(_write(tmp_path / "s.jsonl", [{"t": "x", "y": "pos"}, {"t": "y", "y": "neg"}]),
                        text_field="t", label_field="y")
    assert infer_labels(strs) == ["neg", "pos"]
    explicit = classify_examples(strs, char_encode, bos_id=BOS, eos_id=EOS, seq_len=8, labels=["pos", "neg", "mid"])
    assert [ex.label for ex in explicit.items] == [0, 1] and explicit.counts() == {"pos": 1, "neg": 1, "mid": 0}
    with pytest.raises(DataError) as err:
        classify_examples(strs, char_encode, bos_id=BOS, eos_id=EOS, seq_len=8, labels=["pos", "other"])
    assert one_line_error(err).startswith(f"{tmp_path}/s.jsonl:2: label 'neg' is not in the label set "
                                          "['pos', 'other']")
    with pytest.raises(DataError, match=r"label 1 is not in the label set \['0', '1'\] \('1' is, but labels compare"):
        classify_examples([LabeledText("a", 1, "f:1")], char_encode, bos_id=BOS, eos_id=EOS, seq_len=8,
                          labels=["0", "1"])
    assert infer_labels([LabeledText("a", v, "f") for v in (33, 2, 10, 2)]) == [2, 10, 33]
    assert infer_labels([LabeledText("a", v, "f") for v in ("b", "c", "a")]) == ["a", "b", "c"]
    with pytest.raises(DataError, match="labels mix ints"):
        infer_labels([LabeledText("a", 1, "f:1"), LabeledText("b", "x", "f:2")])
    with pytest.raises(DataError, match="only the label"):
        infer_labels([LabeledText("a", 1, "f:1")])


CLASSIFY_ERRORS = [
    ({"text": "", "label": 1}, r":2: field 'text' is empty"),
    ({"text": "a"}, r":2: missing field 'label'"),
    ({"text": "a", "label": 1.5}, r":2: field 'label' must be an int or a string, got float"),
    ({"text": "a", "label": True}, r":2: field 'label' must be an int or a string, got bool"),
    ('{"text": "a", ', r":2: not valid JSON"),
]


@pytest.mark.parametrize("record,message", CLASSIFY_ERRORS, ids=[m for _, m in CLASSIFY_ERRORS])
def test_classify_record_errors(tmp_path, record, message):
    with pytest.raises(DataError, match=r"bad\.jsonl" + message):
        read_labeled(_write(tmp_path / "bad.jsonl", [{"text": "ok", "label": 0}, record]))


def test_classify_batches_truncation_resume_and_eval():
    records = [LabeledText(chr(65 + i) + "b" * (i % 7), i % 3, f"f:{i}") for i in range(11)]
    data = classify_examples(records, char_encode, bos_id=BOS, eos_id=EOS, seq_len=8)
    assert data.truncated == sum(len(r.text) + 2 > 8 for r in records) > 0
    long = data.items[6]
    assert long.inputs.tolist() == [BOS, *char_encode("Gbbbbb"), EOS]  # "Gbbbbbb" truncated, eos kept last
    assert data.items[0].inputs.tolist() == [BOS, ord("A"), EOS] and data.items[5].label == 2
    no_eos = classify_examples(records, char_encode, bos_id=BOS, eos_id=EOS, seq_len=8, add_eos=False)
    assert no_eos.items[6].inputs.tolist() == [BOS, *char_encode("Gbbbbbb")] and no_eos.truncated == 0
    it = ClassifyIterator(data.items, seq_len=8, batch_size=4, seed=2)
    by_inputs = {tuple(ex.inputs.tolist()): ex.label for ex in data.items}
    labels_seen = []
    for _ in range(3):
        b = next(it)
        assert set(b) == set(CLASSIFY_BATCH_KEYS) and all(v.dtype == np.int32 for v in b.values())
        assert b["inputs"].shape == (4, 8) and b["targets"].shape == b["loss_mask"].shape == (4, 1)
        for r in range(4):
            n = int((b["segment_ids"][r] > 0).sum())
            assert b["segment_ids"][r].tolist() == [1] * n + [0] * (8 - n)
            assert b["positions"][r, :n].tolist() == list(range(n))
            assert b["targets"][r, 0] == by_inputs[tuple(b["inputs"][r, :n].tolist())] and b["loss_mask"][r, 0] == 1
            labels_seen.append(int(b["targets"][r, 0]))
    assert sorted(labels_seen[:11]) == sorted(ex.label for ex in data.items)  # one epoch: each example once
    saved = json.loads(json.dumps(it.get_state()))
    want = [next(it) for _ in range(3)]
    again = ClassifyIterator(data.items, seq_len=8, batch_size=4, seed=2)
    again.set_state(saved)
    for w in want:
        got = next(again)
        assert all((got[k] == w[k]).all() for k in CLASSIFY_BATCH_KEYS)
    evb = classify_eval_batches(data.items, seq_len=8, batch_size=4)
    assert len(evb) == 3 and evb[-1]["loss_mask"][:, 0].tolist() == [1, 1, 1, 0]
    assert (evb[-1]["inputs"][3] == 0).all() and evb[-1]["targets"][3, 0] == 0
    assert [int(t) for b in evb for t, m in zip(b["targets"][:, 0], b["loss_mask"][:, 0]) if m] == [
        ex.label for ex in data.items]
    half = classify_eval_batches(data.items, seq_len=8, batch_size=4, shard_index=1, shard_count=2)
    assert int(sum(b["loss_mask"].sum() for b in half)) == 5
    with pytest.raises(ValueError, match="shard_index=2 is not in"):
        classify_eval_batches(data.items, seq_len=8, batch_size=4, shard_index=2, shard_count=2)


class QkvToySst2(tfds.core.GeneratorBasedBuilder):
    """A stand-in for glue/sst2: "sentence", ClassLabel "label" (test split unlabeled: -1), "idx"."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = epath.Path(__file__)

    def _info(self):
        features = tfds.features.FeaturesDict({
            "sentence": tfds.features.Text(),
            "label": tfds.features.ClassLabel(names=["negative", "positive"]),
            "idx": tfds.features.Scalar(np.int32),
        })
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(6, True), "test": self._generate_examples(3, False)}

    def _generate_examples(self, n, labeled):
        for i in range(n):
            yield i, {"sentence": f"movie {i} was {'good' if i % 2 else 'bad'}", "label": i % 2 if labeled else -1,
                      "idx": i}


def test_tfds_classification_round_trip(tmp_path):
    dd = tmp_path / "dd"
    QkvToySst2(data_dir=dd).download_and_prepare(file_format="array_record")
    records, names = tfds_labeled("qkv_toy_sst2", "train", dd)
    assert names == ["negative", "positive"] and len(records) == 6
    by_text = {r.text: r.label for r in records}
    assert by_text["movie 3 was good"] == "positive" and by_text["movie 2 was bad"] == "negative"
    data = classify_examples(records, char_encode, bos_id=BOS, eos_id=EOS, seq_len=32, labels=names)
    assert {char_decode(ex.inputs[1:-1]): ex.label for ex in data.items}["movie 3 was good"] == 1
    with pytest.raises(DataError, match=r"tfds:qkv_toy_sst2:test\[\d\]: label -1: 3 of 3 .* unlabeled"):
        tfds_labeled("qkv_toy_sst2", "test", dd)
    with pytest.raises(ValueError, match=r"has no feature 'text' .*: set the text and label field names"):
        tfds_labeled("qkv_toy_sst2", "train", dd, text_field="text")
    with pytest.raises(ValueError, match=r"not prepared.*tfds build glue/sst2 --file_format=array_record"):
        tfds_labeled("glue/sst2", "train", tmp_path / "empty")
