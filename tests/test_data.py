"""Tests for qkv.data sources (TFDS array_record, no TensorFlow) and the Grain LM pipeline."""

from __future__ import annotations

import json
import random
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath

from qkv.data import (BATCH_KEYS, Tokenizer, iterator_state_from_json, iterator_state_to_json,
                      make_eval_dataset, make_lm_dataset, open_text_source, stdlib_files,
                      text_builder, train_tokenizer)
from qkv.data.corpus import split_keys

# ----------------------------------------------------------------------------- sources


def _write_corpus(root: Path, n: int = 12) -> dict[str, str]:
    """n small text files (one nested), plus a hidden and an empty file that must be skipped."""
    texts = {}
    for i in range(n):
        rel = f"sub/file{i:02d}.py" if i % 4 == 0 else f"file{i:02d}.txt"
        texts[rel] = f"# document {i}\n" + "".join(f"value_{i}_{j} = {j}\n" for j in range(i + 2))
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(texts[rel])
    (root / ".hidden").write_text("secret\n")
    (root / "empty.txt").write_text("")
    return texts


@pytest.fixture()
def corpus_dir(tmp_path) -> tuple[Path, dict[str, str]]:
    root = tmp_path / "corpus"
    root.mkdir()
    return root, _write_corpus(root)


def _all_texts(source) -> list[str]:
    return source.__getitems__(list(range(len(source))))


def test_files_corpus_splits_by_file(corpus_dir, tmp_path):
    root, texts = corpus_dir
    train = open_text_source("files", str(root), "train", tmp_path / "dd")
    val = open_text_source("files", str(root), "validation", tmp_path / "dd")
    got_train, got_val = _all_texts(train), _all_texts(val)
    assert all(isinstance(t, str) for t in got_train + got_val)
    assert len(got_val) >= 1 and len(got_train) >= 1
    assert not set(got_train) & set(got_val)
    assert sorted(got_train + got_val) == sorted(texts.values())  # no hidden, no empty file
    assert isinstance(train[0], str) and train[np.int64(0)] == train[0]


def test_split_is_deterministic(corpus_dir, tmp_path):
    root, _ = corpus_dir
    a = _all_texts(open_text_source("files", str(root), "validation", tmp_path / "d1"))
    b = _all_texts(open_text_source("files", str(root), "validation", tmp_path / "d2"))
    assert sorted(a) == sorted(b)
    keys = [f"f{i}.txt" for i in range(1000)]
    train, val = split_keys(keys, 0.05)
    assert split_keys(list(reversed(keys)), 0.05) == (train, val)
    assert not set(train) & set(val) and len(train) + len(val) == 1000
    assert 20 < len(val) < 80  # ~5%
    assert split_keys(["a", "b"], 0.01)[1] != []  # at least one validation document


def test_cache_is_reused_and_invalidated(corpus_dir, tmp_path, monkeypatch):
    root, _ = corpus_dir
    data_dir = tmp_path / "dd"
    open_text_source("files", str(root), "train", data_dir)
    infos = list(data_dir.glob("qkv_text/*/1.0.0/dataset_info.json"))
    assert len(infos) == 1
    mtime = infos[0].stat().st_mtime_ns

    def no_rebuild(*args, **kwargs):
        raise AssertionError("dataset was rebuilt although the corpus did not change")

    with monkeypatch.context() as m:
        m.setattr(text_builder.QkvText, "download_and_prepare", no_rebuild)
        again = open_text_source("files", str(root), "train", data_dir)
    assert len(again) > 0 and infos[0].stat().st_mtime_ns == mtime

    (root / "file01.txt").write_text("changed contents\n")  # new size and mtime: new build
    changed = open_text_source("files", str(root), "train", data_dir)
    changed = changed.__getitems__(list(range(len(changed))))
    changed += _all_texts(open_text_source("files", str(root), "validation", data_dir))
    assert "changed contents\n" in changed
    assert len(list(data_dir.glob("qkv_text/*/1.0.0/dataset_info.json"))) == 2
    assert not list(data_dir.glob("qkv_text/*/incomplete*"))


def test_failed_build_leaves_nothing_reusable(corpus_dir, tmp_path, monkeypatch):
    root, _ = corpus_dir
    data_dir = tmp_path / "dd"

    def boom(self, keys):
        yield "k", {"text": "partial"}
        raise RuntimeError("killed mid-build")

    with monkeypatch.context() as m:
        m.setattr(text_builder.QkvText, "_generate_examples", boom)
        with pytest.raises(RuntimeError, match="killed"):
            open_text_source("files", str(root), "train", data_dir)
    assert not list(data_dir.glob("qkv_text/*/1.0.0"))
    assert len(_all_texts(open_text_source("files", str(root), "train", data_dir))) > 1


def test_glob_corpus(corpus_dir, tmp_path):
    root, texts = corpus_dir
    src = open_text_source("files", str(root / "*.txt"), "train", tmp_path / "dd")
    val = open_text_source("files", str(root / "*.txt"), "validation", tmp_path / "dd")
    expected = {t for rel, t in texts.items() if rel.endswith(".txt")}
    assert set(_all_texts(src)) | set(_all_texts(val)) == expected


def test_jsonl_corpus(tmp_path):
    lines = [json.dumps({"text": f"record {i} ✓\n\tindented", "id": i}) for i in range(10)]
    lines.insert(4, "")  # blank lines are allowed
    lines.append(json.dumps({"text": ""}))  # empty text: skipped
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    train = open_text_source("jsonl", str(tmp_path / "a.jsonl"), "train", tmp_path / "dd")
    val = open_text_source("jsonl", str(tmp_path / "a.jsonl"), "validation", tmp_path / "dd")
    got = _all_texts(train) + _all_texts(val)
    assert sorted(got) == sorted(f"record {i} ✓\n\tindented" for i in range(10))
    assert len(_all_texts(val)) >= 1


def test_jsonl_custom_field_and_errors(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"body": f"b{i}"}) + "\n" for i in range(4)))
    src = open_text_source("jsonl", str(good), "train", tmp_path / "dd", text_field="body")
    assert all(t.startswith("b") for t in _all_texts(src))
    with pytest.raises(ValueError, match="no field 'text'"):
        open_text_source("jsonl", str(good), "train", tmp_path / "dd2")

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": "b"}\n{"text": oops}\n{"text": "d"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: malformed JSON"):
        open_text_source("jsonl", str(bad), "train", tmp_path / "dd3")
    assert not list((tmp_path / "dd3").glob("qkv_text/*/1.0.0"))


def test_unprepared_tfds_dataset_gives_clear_error(tmp_path):
    hint = r"not prepared.*tfds build lm1b --file_format=array_record"
    with pytest.raises(ValueError, match=hint):
        open_text_source("tfds", None, "train", tmp_path / "dd", tfds_name="lm1b")
    with pytest.raises(ValueError, match="not in the TFDS catalog"):
        open_text_source("tfds", None, "train", tmp_path / "dd", tfds_name="no_such_dataset_qkv")
    with pytest.raises(ValueError, match="needs a dataset name"):
        open_text_source("tfds", None, "train", tmp_path / "dd")


class QkvToyCatalog(tfds.core.GeneratorBasedBuilder):
    """A stand-in for a TFDS catalog dataset such as lm1b (registered as 'qkv_toy_catalog')."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = epath.Path(__file__)  # see data/text_builder.py

    def _info(self):
        features = tfds.features.FeaturesDict({"sentence": tfds.features.Text()})
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(5), "test": self._generate_examples(2)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"sentence": f"sentence {i} \u00e9"}


def test_prepared_tfds_dataset_opens(tmp_path):
    """kind='tfds' reads any registered dataset prepared as array_record (here a toy one)."""
    dd = tmp_path / "dd"
    QkvToyCatalog(data_dir=dd).download_and_prepare(file_format="array_record")
    src = open_text_source("tfds", None, "test", dd, text_field="sentence",
                           tfds_name="qkv_toy_catalog")
    assert sorted(_all_texts(src)) == ["sentence 0 é", "sentence 1 é"]
    with pytest.raises(ValueError, match="no feature 'text'"):
        open_text_source("tfds", None, "train", dd, tfds_name="qkv_toy_catalog")
    with pytest.raises(ValueError, match="split 'dev' does not exist"):
        open_text_source("tfds", None, "dev", dd, text_field="sentence",
                         tfds_name="qkv_toy_catalog")


BAD_INPUTS = [  # (kind, path relative to tmp_path, split, extra kwargs, error, message)
    ("files", "nope", "train", {}, FileNotFoundError, "does not exist: pass data.path"),
    ("files", None, "train", {}, ValueError, "needs a path"),
    ("files", "empty_dir", "train", {}, ValueError, "has no files"),
    ("files", "*.nothing", "train", {}, ValueError, "matches no files"),
    ("files", "only_empty", "train", {}, ValueError, "0 non-empty document"),
    ("files", "one_file", "train", {}, ValueError, "1 non-empty document"),
    ("parquet", "one_file", "train", {}, ValueError, "unknown corpus kind"),
    ("files", "one_file", "test", {}, ValueError, "split 'test' does not exist"),
    ("stdlib", None, "train", {"validation_fraction": 0.0}, ValueError, "validation_fraction"),
    ("stdlib", "one_file", "train", {}, ValueError, "takes no path"),
]


@pytest.mark.parametrize("kind,path,split,kwargs,error,message", BAD_INPUTS)
def test_bad_inputs_raise_clear_errors(tmp_path, kind, path, split, kwargs, error, message):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "only_empty").mkdir()
    (tmp_path / "only_empty" / "a.txt").write_text("")
    (tmp_path / "only_empty" / "b.txt").write_text("")
    (tmp_path / "one_file").mkdir()
    (tmp_path / "one_file" / "a.txt").write_text("just one document\n")
    full = str(tmp_path / path) if path else None
    with pytest.raises(error, match=message):
        open_text_source(kind, full, split, tmp_path / "dd", **kwargs)
    assert not list((tmp_path / "dd").glob("qkv_text/*/*"))  # nothing half-built


def test_stdlib_files():
    files = stdlib_files()
    assert len(files) > 1000
    assert files == sorted(files)
    assert all(f.suffix == ".py" and f.is_file() for f in files)
    assert not any({"site-packages", "dist-packages"} & set(f.parts) for f in files)
    root = Path(sysconfig.get_paths()["stdlib"])
    assert all(f.is_relative_to(root) for f in files)


def test_stdlib_subset_builds_with_non_utf8_files(tmp_path):
    files = stdlib_files()
    bad = [f for f in files if "encoded_modules" in f.parts][:2]  # latin-1 / koi8-r sources
    chosen = files[:40] + bad
    root = tmp_path / "stdlib_subset"
    for f in chosen:
        dest = root / f.relative_to(Path(sysconfig.get_paths()["stdlib"]))
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(f.read_bytes())
    train = open_text_source("files", str(root), "train", tmp_path / "dd")
    val = open_text_source("files", str(root), "validation", tmp_path / "dd")
    n_nonempty = sum(1 for f in chosen if f.stat().st_size > 0)
    assert len(train) + len(val) == n_nonempty
    texts = _all_texts(train) + _all_texts(val)
    if bad:
        assert any("\ufffd" in t for t in texts)  # undecodable bytes were replaced, not fatal


# ----------------------------------------------------------------------------- pipeline

BOS, EOS = 2, 3
SEQ, BATCH = 32, 4


def _encode(text: str) -> list[int]:
    """Character-level toy tokenizer: every id maps back to exactly one character."""
    return [ord(c) + 4 for c in text]


def _doc_of(token: int) -> int:
    return (token - 4 - 0x4000) // 16


def _make_docs(n: int = 40, seed: int = 0) -> list[str]:
    """Each document uses its own 16 characters, so every token names its document."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        length = rng.choice([0, 1, 3, 10, 30, 31, 32, 33, 70, 150])
        docs.append("".join(chr(0x4000 + 16 * i + rng.randrange(16)) for _ in range(length)))
    return docs


DOCS = _make_docs()


def _segments(batch):
    """Yields (row, segment id, slice) of every non-padding segment."""
    for r in range(batch["segment_ids"].shape[0]):
        seg = batch["segment_ids"][r]
        for s in np.unique(seg[seg > 0]):
            idx = np.nonzero(seg == s)[0]
            assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1)), "segment not contiguous"
            yield r, s, slice(idx[0], idx[-1] + 1)


def _check_batch(batch, docs=DOCS):
    assert set(batch) == set(BATCH_KEYS)
    for k in BATCH_KEYS:
        assert batch[k].shape == (BATCH, SEQ) and batch[k].dtype == np.int32, k
    pad = batch["segment_ids"] == 0
    assert np.array_equal(batch["loss_mask"] == 0, pad)
    assert not batch["inputs"][pad].any() and not batch["targets"][pad].any()
    seen = set()
    for r, _, sl in _segments(batch):
        inp, tgt = batch["inputs"][r, sl], batch["targets"][r, sl]
        assert np.array_equal(batch["positions"][r, sl], np.arange(len(inp)))
        assert np.array_equal(tgt[:-1], inp[1:]), "targets are not next tokens"
        piece = np.concatenate([inp, tgt[-1:]])
        content = [t for t in piece if t not in (BOS, EOS)]
        owners = {_doc_of(t) for t in content}
        assert len(owners) <= 1, "a segment crosses a document boundary"
        if owners:
            doc = owners.pop()
            seen.add(doc)
            full = [BOS] + _encode(docs[doc]) + [EOS]
            text = ",".join(map(str, full)) + ","
            assert ",".join(map(str, piece)) + "," in text, "segment is not a document substring"
            if piece[0] == BOS:
                assert piece[1] == full[1]
    return seen


def _take(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)]


def _lm(docs=DOCS, **kw):
    args = dict(seq_len=SEQ, batch_size=BATCH, seed=0, bos_id=BOS, eos_id=EOS)
    args.update(kw)
    return make_lm_dataset(docs, _encode, **args)


def _equal(a, b):
    return len(a) == len(b) and all(
        all(np.array_equal(x[k], y[k]) for k in BATCH_KEYS) for x, y in zip(a, b)
    )


def test_packed_batches_are_correct():
    batches = _take(_lm(), 40)  # several epochs of the 40-document corpus
    seen = set()
    for b in batches:
        seen |= _check_batch(b)
        assert b["loss_mask"].all(), "packed training rows should have no padding"
    assert seen == {i for i, d in enumerate(DOCS)} - {i for i, d in enumerate(DOCS) if not d}


def test_unpacked_batches_are_correct():
    for b in _take(_lm(pack=False), 20):
        _check_batch(b)
        assert b["segment_ids"].max() <= 1


@pytest.mark.parametrize("pack", [True, False])
def test_eval_pass_covers_every_token_once(pack):
    ds = make_eval_dataset(DOCS, _encode, seq_len=SEQ, batch_size=BATCH, bos_id=BOS,
                           eos_id=EOS, pack=pack)
    batches = list(ds)
    for b in batches:
        _check_batch(b)
    expected = sum(len(d) + 1 for d in DOCS)  # targets per document: len(encode(d)) + 1
    assert sum(int(b["loss_mask"].sum()) for b in batches) == expected
    rows = np.concatenate([b["loss_mask"] for b in batches])
    assert rows[-1].sum() < SEQ  # the final batch is padded, not dropped
    if pack:  # only the last row holding tokens may be partly padding
        partly = [r for r in rows if 0 < r.sum() < SEQ]
        assert len(partly) <= 1
    assert _equal(batches, list(ds))  # the same pass every time (no shuffle)


def test_seeds_determine_the_stream():
    assert _equal(_take(_lm(seed=3), 6), _take(_lm(seed=3), 6))
    assert not _equal(_take(_lm(seed=3), 6), _take(_lm(seed=4), 6))


def test_epochs_are_reshuffled_and_finite_epochs_end():
    one_epoch = list(_lm(num_epochs=1))
    tokens_per_epoch = sum(len(d) + 1 for d in DOCS)
    n_rows = len(one_epoch) * BATCH
    assert n_rows == -(-tokens_per_epoch // SEQ) // BATCH * BATCH  # partial batch dropped
    # Document order, read off the stream: the token after each bos names its document.
    stream = np.concatenate([b["inputs"].reshape(-1) for b in list(_lm(num_epochs=2))])
    starts = np.nonzero(stream[:-1] == BOS)[0] + 1
    order = [_doc_of(t) for t in stream[starts] if t not in (BOS, 0)]  # empty doc: bos only
    nonempty = sorted(i for i, d in enumerate(DOCS) if d)
    first, second = order[: len(nonempty)], order[len(nonempty) :]
    assert sorted(first) == nonempty and len(set(second)) == len(second) > 10
    assert first[: len(second)] != second, "second epoch was not reshuffled"


def test_shards_see_disjoint_documents():
    seen = []
    for shard in range(2):
        ds = make_eval_dataset(DOCS, _encode, seq_len=SEQ, batch_size=BATCH, bos_id=BOS,
                               eos_id=EOS, shard_index=shard, shard_count=2)
        seen.append(set().union(*(_check_batch(b) for b in ds)))
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert seen[0] | seen[1] == {i for i, d in enumerate(DOCS) if d}
    train0 = set().union(*(_check_batch(b) for b in _take(_lm(shard_index=0, shard_count=2), 20)))
    assert train0 <= seen[0]


@pytest.mark.parametrize("pack,shuffle_rows", [(True, 0), (False, 0), (True, 12)])
def test_state_resumes_through_json(pack, shuffle_rows):
    ds = _lm(pack=pack, batch_size=BATCH, shuffle_rows=shuffle_rows)
    it = iter(ds)
    checked, empty_remainder = 0, 0
    for step in range(60):  # crosses several epochs
        state = it.get_state()
        text = iterator_state_to_json(state)
        assert json.loads(json.dumps(state)) == state  # already plain JSON data
        if step % 3 == 0:
            ref = [next(it) for _ in range(3)]
            restored = iter(ds)
            restored.set_state(iterator_state_from_json(text))
            assert _equal([next(restored) for _ in range(3)], ref), f"diverged at step {step}"
            fresh = iter(ds)
            fresh.set_state(json.loads(text))  # plain json.loads works too
            assert _equal([next(fresh) for _ in range(3)], ref)
            checked += 1
            empty_remainder += text.count("[-1, -1]") > 0
        else:
            next(it)
    assert checked == 20
    if pack:
        # The JSON pitfall (tuple (-1, -1) becomes a list) must have been exercised.
        assert empty_remainder > 0


def test_row_shuffle_mixes_long_documents_into_every_batch():
    """Packing lays a long document over consecutive rows; the row-shuffle window permutes those rows
    (the same rows, another order), so a batch draws on several documents instead of one."""
    docs = [d * 8 for d in DOCS]  # long documents span several rows (indices kept: tokens name them)
    window = 64
    plain, mixed = _take(_lm(docs, shuffle_rows=0), window // BATCH), _take(_lm(docs, shuffle_rows=window), window // BATCH)

    def rows(batches):
        return sorted(tuple(b[k][r].tolist() for k in BATCH_KEYS) for b in batches for r in range(BATCH))

    def documents_per_batch(batches):
        return np.mean([len({_doc_of(t) for t in b["inputs"].ravel() if t not in (BOS, EOS, 0)}) for b in batches])

    assert rows(plain) == rows(mixed), "the window must permute the packed rows, not change them"
    for b in mixed:
        _check_batch(b, docs)
    assert documents_per_batch(plain) < 2.0  # measured 1.5
    assert documents_per_batch(mixed) > 3.0  # measured 3.6 (4 rows per batch)


def test_pipeline_argument_errors():
    with pytest.raises(ValueError, match="shard_index"):
        _lm(shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="documents for 50 shards"):
        _lm(shard_index=0, shard_count=50)
    with pytest.raises(ValueError, match="num_epochs"):
        _lm(num_epochs=0)


# ----------------------------------------------------------------------------- end to end


def test_tfds_source_with_real_tokenizer(corpus_dir, tmp_path):
    root, texts = corpus_dir
    train = open_text_source("files", str(root), "train", tmp_path / "dd")
    tok = Tokenizer.load(train_tokenizer(list(texts.values()), tmp_path / "tok", vocab_size=400))
    ds = make_lm_dataset(train, tok.encode, seq_len=16, batch_size=2, seed=1,
                         bos_id=tok.bos_id, eos_id=tok.eos_id)
    docs = _all_texts(train)
    for b in _take(ds, 10):
        for r in range(2):
            seg = b["segment_ids"][r]
            for s in np.unique(seg[seg > 0]):
                ids = b["inputs"][r][seg == s]
                tgt = b["targets"][r][seg == s]
                assert np.array_equal(tgt[:-1], ids[1:])
                piece = tok.decode(list(ids) + [int(tgt[-1])])
                assert any(piece in d for d in docs), piece
