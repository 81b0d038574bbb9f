"""Streamed sharded sources (data/streams.py, data/mixture.py): every format and filesystem gives the same
batches as the same documents in plain JSONL, resumes are exact, mixtures hold their shares, processes read
disjoint shards, and bad data gets one `qkv: error:` line naming the shard and row."""
from __future__ import annotations

import gzip
import json
import logging
import random
import sys
from pathlib import Path

import fsspec
import numpy as np
import pytest

from qkv.cli import main
from qkv.data import MixtureIterator, RowStream, StreamSource, Tokenizer, list_shards, open_sources, read_rows
from qkv.data import iterator_state_from_json, iterator_state_to_json, train_tokenizer

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
zstandard = pytest.importorskip("zstandard")
datasets = pytest.importorskip("datasets")

SEQ, BATCH = 16, 4
N_SHARDS, PER_SHARD = 2, 40


def _docs(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 7))) for _ in range(300)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(2, 30))) for _ in range(n)]


def _jsonl(docs: list[str]) -> bytes:
    return "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)).encode()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """The same documents, in two shards, in every format; and a tiny real tokenizer."""
    root = tmp_path_factory.mktemp("sources")
    shards = [_docs(s, PER_SHARD) for s in range(N_SHARDS)]
    tok_path = train_tokenizer([d for s in shards for d in s], root / "tok", vocab_size=300, seed=0)
    tok = Tokenizer.load(tok_path)
    out = {"root": root, "docs": shards, "tok": tok, "tok_path": str(tok_path)}
    for name in ("plain", "zst", "gz", "parquet", "ids", "hfparquet"):
        (root / name).mkdir()
    for i, docs in enumerate(shards):
        raw = _jsonl(docs)
        (root / "plain" / f"part-{i}.jsonl").write_bytes(raw)
        (root / "zst" / f"part-{i}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
        (root / "gz" / f"part-{i}.json.gz").write_bytes(gzip.compress(raw))
        pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), root / "parquet" / f"part-{i}.parquet",
                       row_group_size=7)
        pq.write_table(pa.table({"input_ids": [tok.encode(d) for d in docs]}), root / "ids" / f"part-{i}.parquet")
        pq.write_table(pa.table({"text": docs}), root / "hfparquet" / f"train-{i:05d}-of-{N_SHARDS:05d}.parquet")
    ds = datasets.Dataset.from_dict({"text": [d for s in shards for d in s]})
    ds.save_to_disk(str(root / "saved"), num_shards=N_SHARDS)
    return out


def _entry(kind: str, path: str, **kw) -> dict:
    return {"kind": kind, "path": path, "weight": 1.0, **kw}


def _batches(entries: list[dict], tok: Tokenizer, n: int, split: str = "train", state=None, **kw) -> tuple[list, dict]:
    sources = open_sources(entries)
    streams = [RowStream(s, tok.encode, split=split, seq_len=SEQ, seed=3, bos_id=tok.bos_id, eos_id=tok.eos_id,
                         validation_fraction=0.1, shuffle_rows=kw.get("shuffle_rows", 8) if split == "train" else 0,
                         num_epochs=None if split == "train" else 1, process_index=kw.get("process_index", 0),
                         process_count=kw.get("process_count", 1)) for s in sources]
    it = MixtureIterator(streams, [s.weight for s in sources], BATCH, finite=split != "train")
    if state is not None:
        it.set_state(iterator_state_from_json(state))
    out = [next(it) for _ in range(n)] if split == "train" else list(it)
    return out, it


def _same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


FORMATS = [
    ("zst", lambda r: _entry("jsonl", f"{r}/zst/*.jsonl.zst")),
    ("gz", lambda r: _entry("jsonl", f"{r}/gz")),
    ("parquet", lambda r: _entry("parquet", f"{r}/parquet/part-*.parquet")),
    ("hf-saved", lambda r: _entry("hf", f"{r}/saved")),
    ("hf-parquet-files", lambda r: _entry("hf", f"{r}/hfparquet")),
    ("file-url", lambda r: _entry("jsonl", f"file://{r}/plain/*.jsonl")),
]


@pytest.mark.parametrize("name,entry", FORMATS, ids=[f[0] for f in FORMATS])
def test_every_format_gives_the_plain_jsonl_batches(files, name, entry):
    tok, root = files["tok"], files["root"]
    plain = _entry("jsonl", f"{root}/plain/*.jsonl")
    _same(_batches([entry(root)], tok, 12)[0], _batches([plain], tok, 12)[0])
    _same(_batches([entry(root)], tok, 0, "validation")[0], _batches([plain], tok, 0, "validation")[0])


def test_token_id_column_gives_the_text_batches(files):
    tok, root = files["tok"], files["root"]
    ids = _entry("parquet", f"{root}/ids", token_field="input_ids")
    _same(_batches([ids], tok, 12)[0], _batches([_entry("parquet", f"{root}/parquet")], tok, 12)[0])


def test_memory_filesystem_gives_the_plain_batches(files):
    tok, root = files["tok"], files["root"]
    fs = fsspec.filesystem("memory")
    for p in sorted((root / "zst").iterdir()):
        fs.pipe(f"/qkv-test/zst/{p.name}", p.read_bytes())
    _same(_batches([_entry("jsonl", "memory://qkv-test/zst/*.zst")], tok, 12)[0],
          _batches([_entry("jsonl", f"{root}/plain/*.jsonl")], tok, 12)[0])


def test_batches_follow_the_contract_and_validation_is_disjoint(files):
    tok, root = files["tok"], files["root"]
    plain = _entry("jsonl", f"{root}/plain")
    rows = {tuple(r) for b in _batches([plain], tok, 0, "validation")[0] for r, m in zip(b["inputs"], b["loss_mask"])
            if m.any()}
    batch = _batches([plain], tok, 1)[0][0]
    assert batch["inputs"].shape == (BATCH, SEQ) and batch["loss_mask"].all()
    # A target is the next input within a segment; positions restart at 0 in every segment.
    same = batch["segment_ids"][:, 1:] == batch["segment_ids"][:, :-1]
    assert (batch["targets"][:, :-1][same] == batch["inputs"][:, 1:][same]).all()
    assert (batch["positions"][:, 1:][~same] == 0).all()
    # The held-out documents: every streamed document is in exactly one split.
    val_docs = [d for s in open_sources([plain]) for d in
                RowStream(s, tok.encode, split="validation", seq_len=SEQ, seed=0, bos_id=1, eos_id=2,
                          validation_fraction=0.1, num_epochs=1).texts(10**6)]
    train_docs = RowStream(open_sources([plain])[0], tok.encode, split="train", seq_len=SEQ, seed=0, bos_id=1, eos_id=2,
                           validation_fraction=0.1, num_epochs=1).texts(10**6)
    assert rows and val_docs and sorted(val_docs + train_docs) == sorted(d for s in files["docs"] for d in s)


def test_resume_from_a_json_state_continues_exactly(files):
    tok, root = files["tok"], files["root"]
    mix = [_entry("parquet", f"{root}/parquet", weight=2), _entry("jsonl", f"{root}/zst", weight=1)]
    whole, _ = _batches(mix, tok, 30)
    for cut in (1, 7, 13):
        first, it = _batches(mix, tok, cut)
        state = iterator_state_to_json(it.get_state())
        rest, _ = _batches(mix, tok, 30 - cut, state=state)
        _same(first + rest, whole)


def test_mixture_shares_within_one_percent_over_2000_rows(files):
    tok, root = files["tok"], files["root"]
    mix = [_entry("jsonl", f"{root}/plain", weight=0.6, name="a"), _entry("parquet", f"{root}/parquet", weight=0.3,
           name="b"), _entry("jsonl", f"{root}/gz", weight=0.1, name="c")]
    sources = open_sources(mix)
    streams = [RowStream(s, tok.encode, split="train", seq_len=SEQ, seed=1, bos_id=tok.bos_id, eos_id=tok.eos_id,
                         validation_fraction=0.1, shuffle_rows=0) for s in sources]
    it = MixtureIterator(streams, [0.6, 0.3, 0.1], 8)
    tokens = np.zeros(3)
    for _ in range(2000 // 8):
        batch = next(it)
        for src, mask in zip(it.last_sources, batch["loss_mask"]):
            tokens[src] += mask.sum()
    shares = tokens / tokens.sum()
    assert np.abs(shares - [0.6, 0.3, 0.1]).max() < 0.01, shares


def test_changed_weights_on_resume_are_logged_and_followed(files, caplog):
    tok, root = files["tok"], files["root"]
    mix = [_entry("jsonl", f"{root}/plain", weight=1, name="a"), _entry("parquet", f"{root}/parquet", weight=1, name="b")]
    _, it = _batches(mix, tok, 10)
    state = iterator_state_to_json(it.get_state())
    mix[0]["weight"] = 3
    with caplog.at_level(logging.WARNING, logger="qkv.data"):
        _, resumed = _batches(mix, tok, 0, state=state)
    assert "weights changed on resume: a=0.5, b=0.5 -> a=0.75, b=0.25" in caplog.text
    picks = []
    for _ in range(10):
        next(resumed)
        picks += resumed.last_sources
    assert picks.count(0) == 30 and picks.count(1) == 10


def test_processes_read_disjoint_shards_and_cover_every_document_once(files):
    tok, root = files["tok"], files["root"]
    source = open_sources([_entry("jsonl", f"{root}/zst")])[0]
    seen = []
    for rank in range(2):
        stream = RowStream(source, tok.encode, split="train", seq_len=SEQ, seed=0, bos_id=tok.bos_id,
                           eos_id=tok.eos_id, validation_fraction=1e-9, shuffle_rows=4, num_epochs=1,
                           process_index=rank, process_count=2)
        seen.append([(k, row) for (_, k, row), _ in stream.documents()])
        assert {r for _, r in seen[-1]} == set(range(PER_SHARD))  # one whole shard each
    assert len(seen[0]) + len(seen[1]) == N_SHARDS * PER_SHARD


def test_a_glob_of_many_shards_is_listed_in_order(tmp_path):
    for i in range(1500):
        (tmp_path / f"s-{i:05d}.jsonl").write_text('{"text": "x"}\n')
    shards = list_shards("jsonl", f"{tmp_path}/s-*.jsonl")
    assert len(shards) == 1500 and shards[0].path.endswith("s-00000.jsonl") and shards[-1].path.endswith("s-01499.jsonl")


# --- bad input: one line naming the shard and row, nothing left in the run dir -----------------------------------

def _bad_files(root: Path) -> dict[str, str]:
    bad = root / "bad"
    bad.mkdir(exist_ok=True)
    good = _jsonl(_docs(9, 30))
    (bad / "truncated.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(good)[:-40])
    (bad / "truncated.json.gz").write_bytes(gzip.compress(good)[:-30])
    pq.write_table(pa.table({"text": _docs(9, 30)}), bad / "whole.parquet")
    (bad / "truncated.parquet").write_bytes((bad / "whole.parquet").read_bytes()[:-200])
    pq.write_table(pa.table({"body": _docs(9, 5)}), bad / "nocolumn.parquet")
    (bad / "number.jsonl").write_text('{"text": "fine"}\n{"text": 7}\n')
    return {k: str(bad / k) for k in ("truncated.jsonl.zst", "truncated.json.gz", "truncated.parquet",
                                      "nocolumn.parquet", "number.jsonl")}


BAD = [
    ("truncated-zst", ["data.source=jsonl", "data.path={truncated.jsonl.zst}"], "truncated.jsonl.zst"),
    ("truncated-gz", ["data.source=jsonl", "data.path={truncated.json.gz}"], "truncated.json.gz"),
    ("truncated-parquet", ["data.source=parquet", "data.path={truncated.parquet}"], "truncated.parquet: cannot read it"),
    ("missing-column", ["data.source=parquet", "data.path={nocolumn.parquet}"], "nocolumn.parquet: no column 'text'"),
    ("not-a-string", ["data.source=jsonl", "data.stream=true", "data.path={number.jsonl}"],
     "number.jsonl line 2: field 'text' is int, not a string"),
    ("empty-mixture", ["data.mixture=[]"], "data.mixture is empty"),
    ("weight-zero", ["data.mixture=[{kind: jsonl, path: {number.jsonl}, weight: 0}]"], "data.mixture[0].weight=0 must be"),
    ("unknown-scheme", ["data.source=parquet", "data.path=nosuch://bucket/x.parquet"], "cannot open URL scheme 'nosuch'"),
]


@pytest.mark.parametrize("case,args,words", BAD, ids=[b[0] for b in BAD])
def test_bad_data_gets_one_line_naming_shard_and_row(files, case, args, words, capsys, tmp_path):
    paths = _bad_files(files["root"])
    run_dir = tmp_path / "run"
    for name, path in paths.items():
        args = [a.replace("{" + name + "}", path) for a in args]
    argv = ["pretrain", "tiny", *args,
            "model.vocab_size=512", "tokenizer.train_documents=100000", f"train.run_dir={run_dir}", "train.steps=2"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qkv: error: ") and words in err[0], err
    assert not run_dir.exists()


# --- through `qkv pretrain` --------------------------------------------------------------------------------------

SMALL = ["model.vocab_size=512", "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.d_ff=64",
         "model.max_seq_len=16", "data.seq_len=16", "train.batch_size=8", "data.eval_batches=2",
         "data.validation_fraction=0.1", "train.sample_tokens=0", "train.log_every=1", "train.eval_every=3",
         "train.progress=false", "data.shuffle_rows=8", "train.steps=3"]


def _losses(run_dir: Path) -> list[tuple[str, int, float]]:
    return [(r["split"], r["step"], r["loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


@pytest.mark.slow
def test_pretrain_on_parquet_zst_and_memory_urls_equals_plain_jsonl(files, tmp_path):
    root, tok = files["root"], files["tok_path"]
    fs = fsspec.filesystem("memory")
    for p in sorted((root / "parquet").iterdir()):
        fs.pipe(f"/qkv-run/{p.name}", p.read_bytes())
    runs = {"plain": ["data.source=jsonl", "data.stream=true", f"data.path={root}/plain"],
            "parquet-memory": ["data.source=parquet", "data.path=memory://qkv-run/*.parquet"],
            "zst": ["data.source=jsonl", f"data.path={root}/zst"]}
    losses = {}
    for name, args in runs.items():
        run_dir = tmp_path / name
        url = f"file://{run_dir}" if name == "zst" else str(run_dir)
        assert main(["pretrain", "tiny", *SMALL, *args, f"tokenizer.path={tok}", f"train.run_dir={url}"]) == 0
        losses[name] = _losses(run_dir)
    assert losses["plain"] and losses["plain"] == losses["parquet-memory"] == losses["zst"]


def _mixture_argv(files: dict, run_dir: Path, *extra: str, web: float = 0.6) -> list[str]:
    root = files["root"]
    mix = (f"data.mixture=[{{kind: jsonl, path: '{root}/plain', weight: {web}, name: web}}, "
           f"{{kind: parquet, path: '{root}/parquet', weight: 0.3, name: books}}, "
           f"{{kind: jsonl, path: '{root}/zst', weight: 0.1, name: code}}]")
    return [sys.executable, "-m", "qkv.cli", "pretrain", "tiny", *SMALL, mix, f"tokenizer.path={files['tok_path']}",
            f"train.run_dir={run_dir}", "train.steps=24", "train.checkpoint_every=4", "train.eval_every=12", *extra]


def _train_losses(run_dir: Path) -> list[tuple[int, float]]:
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []:
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if r.get("split") == "train":
            out.append((r["step"], r["loss"]))
    return out


@pytest.mark.slow
def test_mixture_sigkill_mid_run_resumes_with_bit_identical_losses(files, tmp_path):
    import os
    import signal
    import subprocess
    import time

    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    ref = tmp_path / "ref"
    done = subprocess.run(_mixture_argv(files, ref), capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r.get("split") == "train"][-1]
    assert {"tokens_web", "tokens_books", "tokens_code"} <= last.keys()
    shares = np.array([last["tokens_web"], last["tokens_books"], last["tokens_code"]], float)
    assert np.abs(shares / shares.sum() - [0.6, 0.3, 0.1]).max() < 0.02  # 192 rows: within one row per source
    ev = [r for r in records if r.get("split") == "eval"][-1]
    assert {"loss_web", "loss_books", "loss_code", "bits_per_byte_code"} <= ev.keys()

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_mixture_argv(files, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(_train_losses(killed)) < 7:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < len(_train_losses(killed)) < 24  # killed mid-run
    again = subprocess.run(_mixture_argv(files, killed), capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _train_losses(killed) == _train_losses(ref)
    # New weights on resume: allowed, logged, followed from there on.
    more = subprocess.run(_mixture_argv(files, killed, "train.steps=30", web=1.2), capture_output=True, text=True,
                          env=env, timeout=600)
    assert more.returncode == 0, more.stderr[-3000:]
    assert "data mixture weights changed on resume: web=0.6, books=0.3, code=0.1 -> web=0.75" in more.stdout + more.stderr
    assert [s for s, _ in _train_losses(killed)] == list(range(1, 31))


def test_data_inspect_reports_each_source_and_the_mixture(files, capsys):
    root = files["root"]
    mix = (f"data.mixture=[{{kind: jsonl, path: '{root}/zst', weight: 3, name: web}}, "
           f"{{kind: parquet, path: '{root}/ids', token_field: input_ids, weight: 1, name: ids}}]")
    assert main(["data", "inspect", "tiny", mix, f"tokenizer.path={files['tok_path']}", "--count-shards", "1",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["sources"]
    assert [s["name"] for s in report] == ["web", "ids"] and [s["share"] for s in report] == [0.75, 0.25]
    assert all(s["shards"] == N_SHARDS and s["documents"] == N_SHARDS * PER_SHARD and s["documents_estimated"]
               for s in report)
    tok = files["tok"]
    want = np.mean([len(tok.encode(d)) for s in files["docs"] for d in s])  # all 80 are within the 200 sampled
    assert report[0]["tokens_per_document"] == pytest.approx(want) == report[1]["tokens_per_document"]
    assert report[0]["sample"] == report[1]["sample"] == tok.decode(tok.encode(files["docs"][0][0])[:64])


def test_benchmark_data_counts_the_tokens_it_times(files, capsys):
    argv = ["benchmark", "data", "tiny", "data.source=parquet", f"data.path={files['root']}/parquet",
            f"tokenizer.path={files['tok_path']}", "data.seq_len=16", "train.batch_size=4", "--batches", "3", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == 3 * 4 * 16 and result["tokens_per_s"] > 0 and result["workers"] == 1


@pytest.mark.slow
def test_two_launched_processes_each_read_their_own_shards(files, tmp_path):
    """`qkv launch local` with 2 processes: each process's saved position is the one its own shards give
    (process p reads shards p::2, which test_processes_read_disjoint_shards... shows cover every document once)."""
    import os
    import subprocess

    from qkv.train import checkpoint

    root, run_dir = files["root"], tmp_path / "two"
    cmd = [sys.executable, "-m", "qkv.cli", "launch", "local", "--processes", "2", "--devices-per-process", "2",
           "--timeout", "240", "--", "pretrain", "tiny", *SMALL, "mesh.data=2", "mesh.fsdp=2",
           "data.source=parquet", f"data.path={root}/parquet", f"tokenizer.path={files['tok_path']}",
           "train.seed=3", f"train.run_dir={run_dir}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "QKV_DEBUG": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    states = [json.loads(s) for s in checkpoint.read_meta(run_dir)["data_per_process"]]
    tok = files["tok"]
    for rank in range(2):
        _, it = _batches([_entry("parquet", f"{root}/parquet", name="parquet")], tok, 3, process_index=rank,
                         process_count=2)
        want = json.loads(iterator_state_to_json(it.get_state()))
        assert states[rank] == want
    assert states[0] != states[1]


def test_prepared_array_record_gives_the_source_batches(files, tmp_path, capsys):
    root, tok = files["root"], files["tok"]
    assert main(["data", "prepare", "tiny", "data.source=jsonl", f"data.path={root}/zst",
                 f"tokenizer.path={files['tok_path']}", "--out", str(tmp_path / "prep")]) == 0
    assert json.loads(capsys.readouterr().out)["jsonl"]["rows"] == N_SHARDS * PER_SHARD
    prepared = _entry("prepared", str(tmp_path / "prep" / "jsonl"))
    plain = _entry("jsonl", f"{root}/plain")
    _same(_batches([prepared], tok, 12)[0], _batches([plain], tok, 12)[0])
    _same(_batches([prepared], tok, 0, "validation")[0], _batches([plain], tok, 0, "validation")[0])
