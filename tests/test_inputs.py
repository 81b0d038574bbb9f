"""Every config field checked at load by range and meaning (train/validate.py), YAML files read strictly,
sampling flags checked before the slow part. Each case: exit 2, one `qkv: error:` line naming the key."""
from __future__ import annotations

from pathlib import Path

import pytest

from qkv.cli import main
from qkv.train.config import load_config
from qkv.train.validate import RULES


def _file(tmp: Path, name: str, content: str | bytes) -> str:
    path = tmp / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


# (case id, argv after `qkv config` (tmp -> list), words the one line must contain)
CONFIG_CASES = [
    ("lr-negative", lambda t: ["optim.learning_rate=-1"], "optim.learning_rate=-1.0 must be a finite number > 0"),
    ("lr-nan", lambda t: ["optim.learning_rate=nan"], "optim.learning_rate=nan"),
    ("lr-inf", lambda t: ["optim.learning_rate=.inf"], "optim.learning_rate=inf"),
    ("lr-zero", lambda t: ["optim.learning_rate=0"], "optim.learning_rate=0"),
    ("muon-lr-zero", lambda t: ["optim.muon_learning_rate=0"], "optim.muon_learning_rate=0"),
    ("muon-lora", lambda t: ["lora-tiny", "optim.name=muon"], "optim.name=muon cannot train LoRA adapters"),
    ("warmup-negative", lambda t: ["optim.warmup_steps=-10"], "optim.warmup_steps=-10 must be an integer >= 0"),
    ("seq-len-1", lambda t: ["data.seq_len=1"], "data.seq_len=1 must be an integer in [2"),
    ("steps-huge", lambda t: ["train.steps=100000000000000000000"], "train.steps=100000000000000000000"),
    ("steps-float-text", lambda t: ["train.steps=1e20"], "train.steps='1e20' must be an int: write whole digits"),
    ("eval-batches-negative", lambda t: ["data.eval_batches=-1"], "data.eval_batches=-1"),
    ("shuffle-rows-negative", lambda t: ["data.shuffle_rows=-1"], "data.shuffle_rows=-1"),
    ("grad-clip-negative", lambda t: ["optim.grad_clip=-1"], "optim.grad_clip=-1.0"),
    ("b2-above-one", lambda t: ["optim.b2=2.0"], "optim.b2=2.0 must be in [0, 1)"),
    ("b1-one", lambda t: ["optim.b1=1"], "optim.b1=1.0 must be in [0, 1)"),
    ("batch-huge", lambda t: ["train.batch_size=1000000000000"], "train.batch_size=1000000000000"),
    ("seed-2-pow-70", lambda t: [f"train.seed={2**70}"], f"train.seed={2**70} must be an integer in [0, 4294967295]"),
    ("seed-negative", lambda t: ["train.seed=-1"], "train.seed=-1"),
    ("run-dir-empty", lambda t: ["train.run_dir="], "train.run_dir='' must be a non-empty path"),
    ("eps-zero", lambda t: ["optim.eps=0"], "optim.eps=0"),
    ("min-lr-ratio", lambda t: ["optim.min_lr_ratio=1.5"], "optim.min_lr_ratio=1.5 must be in [0, 1]"),
    ("weight-decay-nan", lambda t: ["optim.weight_decay=.nan"], "optim.weight_decay=nan"),
    ("validation-fraction", lambda t: ["data.validation_fraction=1"], "data.validation_fraction=1.0 must be in (0, 1)"),
    ("rope-theta-zero", lambda t: ["model.rope_theta=0"], "model.rope_theta=0.0"),
    ("norm-eps-inf", lambda t: ["model.norm_eps=.inf"], "model.norm_eps=inf"),
    ("mesh-axis-zero", lambda t: ["mesh.tensor=0"], "mesh.tensor=0 must be -1 or a positive integer"),
    ("mesh-rules-number", lambda t: ["mesh.rules={batch: 3}"], "mesh.rules="),
    ("sample-tokens-negative", lambda t: ["train.sample_tokens=-1"], "train.sample_tokens=-1"),
    ("labels-not-list", lambda t: ["finetune.labels=3"], "finetune.labels=3"),
    ("lora-targets-empty", lambda t: ["finetune.lora.targets=[]"], "finetune.lora.targets=[]"),
    ("dpo-beta-nan", lambda t: ["finetune.dpo_beta=nan"], "finetune.dpo_beta=nan"),
    ("duplicate-yaml-key", lambda t: [_file(t, "dup.yaml", "train:\n  steps: 3\n  steps: 4\n")],
     "duplicate key 'steps' (first on line 2, again on line 3)"),
    ("duplicate-yaml-section", lambda t: [_file(t, "dups.yaml", "train: {steps: 3}\noptim: {}\ntrain: {seed: 1}\n")],
     "duplicate key 'train'"),
    ("yaml-bare-string", lambda t: [_file(t, "str.yaml", "hello\n")], "str.yaml' must be a mapping of sections, got a str"),
    ("yaml-list", lambda t: [_file(t, "list.yaml", "- a\n- b\n")], "list.yaml' must be a mapping of sections, got a list"),
    ("yaml-binary", lambda t: [_file(t, "bin.yaml", b"\x89PNG\r\n\x1a\n\x00\xff\xfe")],
     "bin.yaml' is not a text file (byte 0 is not UTF-8)"),
]


@pytest.mark.parametrize("case", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_value_refused_with_one_line(case, tmp_path, capsys):
    _, argv, expected = case
    code = main(["config", *argv(tmp_path)])
    out = capsys.readouterr()
    err = out.err.strip().splitlines()
    assert code == 2 and out.out == ""
    assert len(err) == 1 and err[0].startswith("qkv: error: "), err
    assert expected in err[0], err[0]
    assert ": use " in err[0] or ": write " in err[0] or ": keep " in err[0] or ": give " in err[0], err[0]


def test_every_preset_passes_its_own_checks():
    from qkv.train.config import preset_names
    for name in preset_names():
        load_config(name)


def test_rules_name_real_fields():
    """The table names only fields that exist (a renamed field cannot silently drop its check)."""
    import dataclasses

    from qkv.train.config import Config, FinetuneConfig
    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    for section, rules in RULES.items():
        cls = (FinetuneConfig.__dataclass_fields__["lora"].default_factory().__class__ if section == "finetune.lora"
               else getattr(Config(), section).__class__)
        names = {f.name for f in dataclasses.fields(cls)}
        assert {r[0] for r in rules} <= names, (section, {r[0] for r in rules} - names)
    assert set(sections) <= set(RULES)


def test_boundary_values_accepted():
    cfg = load_config("tiny", ["optim.warmup_steps=0", "optim.grad_clip=0", "optim.b1=0", "data.seq_len=2",
                               f"train.seed={2**32 - 1}", "data.eval_batches=0", "optim.min_lr_ratio=1",
                               "mesh.rules={batch: [data, fsdp], embed: null}"])
    assert cfg.train.seed == 2**32 - 1 and cfg.data.seq_len == 2


# ----------------------------------------------------------------------------- runs, corpora, tokenizers, sampling

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402

SMALL = ["model.vocab_size=512", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64",
         "model.max_seq_len=32", "data.seq_len=32", "train.batch_size=8", "data.eval_batches=1",
         "tokenizer.train_documents=40", "data.validation_fraction=0.5", "train.progress=false"]
TINY_TEXT = ["def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n",
             "class Box:\n    def __init__(self, x):\n        self.x = x\n"]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qkv: error: "), err
    return err[0]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A run on a two-file corpus: its tokenizer has far fewer pieces than model.vocab_size=512, and the
    end-of-run sample (sampling over the whole output layer) must not produce ids no piece has."""
    tmp = tmp_path_factory.mktemp("inputs")
    corpus = tmp / "corpus"
    corpus.mkdir()
    for i, text in enumerate(TINY_TEXT):
        (corpus / f"{i}.py").write_text(text)
    code = main(["pretrain", "tiny", *SMALL, "train.steps=2", "train.sample_tokens=24", "data.source=files",
                 f"data.path={corpus}", f"data.data_dir={tmp / 'd'}", f"train.run_dir={tmp / 'run'}",
                 "train.checkpoint_every=1", "train.keep_checkpoints=5"])
    assert code == 0
    return tmp / "run"


def test_tokenizer_smaller_than_the_model_vocab_trains_and_samples(tiny_run, capsys):
    from qkv.data import Tokenizer
    tok = Tokenizer.load(tiny_run / "tokenizer.model")
    assert tok.vocab_size < 400  # far below model.vocab_size=512: the ids above it have no piece
    assert main(["generate", "--checkpoint", str(tiny_run), "--prompt", "def ", "--max-new-tokens", "20",
                 "--temperature", "2.0", "--seed", "3"]) == 0
    assert main(["generate", "--checkpoint", str(tiny_run), "--prompt", "def ", "--max-new-tokens", "6",
                 "--beam-size", "3"]) == 0
    import qkv
    lm = qkv.load(tiny_run)
    for seed in range(3):
        ids = lm._decoder(20, 2.0, 0, 1.0, seed).generate(lm.params, lm.prompt_ids(["x"]), tok.pad_id, None)[0]
        assert max(ids) < tok.vocab_size


def test_max_new_tokens_beyond_the_context_generates_what_fits_with_a_note(tiny_run, capsys):
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(tiny_run), "--prompt", "def ", "--max-new-tokens", "100000",
                 "--temperature", "0", "--no-stream"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [e for e in err if e.startswith("qkv: note: --max-new-tokens=100000 is more than the ")], err
    assert "context of 32" in err[0] and "generating at most" in err[0]
    import qkv
    lm = qkv.load(tiny_run)
    with pytest.warns(UserWarning, match="max_new_tokens=1000 is more than the"):
        lm.generate("def ", max_new_tokens=1000, temperature=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lm.generate("def ", max_new_tokens=3, temperature=0.0)  # within the context: no warning


SAMPLING_CASES = [
    ("temperature-nan", ["--temperature", "nan"], "temperature=nan must be a finite number >= 0"),
    ("temperature-inf", ["--temperature", "inf"], "temperature=inf"),
    ("top-p-nan", ["--top-p", "nan"], "top_p=nan"),
    ("top-k-huge", ["--top-k", str(2**40)], "top_k="),
    ("seed-negative", ["--seed", "-1"], "seed=-1"),
    ("beam-zero", ["--beam-size", "0"], "beam_size=0 must be an integer in [1, 1024]"),
    ("beam-huge", ["--beam-size", "100000"], "beam_size=100000"),
    ("length-penalty-nan", ["--beam-size", "2", "--length-penalty", "nan"], "length_penalty=nan"),
    ("temperature-not-a-number", ["--temperature", "warm"], "argument --temperature: invalid float value: 'warm'"),
    ("unknown-flag", ["--temprature", "1"], "unrecognized arguments: --temprature"),
    ("missing-step", ["--step", "7"], "no checkpoint step 7 in "),
]


@pytest.mark.parametrize("case", SAMPLING_CASES, ids=[c[0] for c in SAMPLING_CASES])
def test_sampling_flag_refused_with_one_line(case, tiny_run, capsys):
    _, flags, expected = case
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(tiny_run), "--prompt", "x", *flags]) == 2
    line = one_error_line(capsys)
    assert expected in line, line
    if "step 7" in expected:
        assert "the steps there are 1, 2" in line


def test_api_refuses_bad_sampling_values(tiny_run):
    import qkv
    lm = qkv.load(tiny_run)
    for kwargs, key in ((dict(temperature=float("nan")), "temperature"), (dict(top_p=0.0), "top_p"),
                        (dict(beam_size=0), "beam_size"), (dict(seed=2**40), "seed")):
        with pytest.raises(ValueError, match=key):
            lm.generate("x", **kwargs)


def test_blank_corpus_refused_before_anything_is_cached(tmp_path, capsys):
    corpus = tmp_path / "blank"
    corpus.mkdir()
    for i, text in enumerate([" \n\n\t  \n", "\n" * 50, "   "]):
        (corpus / f"{i}.txt").write_text(text)
    data_dir = tmp_path / "cache"
    code = main(["pretrain", "tiny", *SMALL, "data.source=files", f"data.path={corpus}", f"data.data_dir={data_dir}",
                 f"train.run_dir={tmp_path / 'run'}"])
    assert code == 2
    assert "corpus has 0 non-empty document(s) (whitespace-only ones do not count)" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()
    assert not data_dir.exists() or not any(p.is_file() for p in data_dir.rglob("*")), list(data_dir.rglob("*"))


def test_files_that_are_not_what_they_should_be(tiny_run, tmp_path, capsys):
    config = Path(__file__).parent.parent / "configs" / "tiny.yaml"
    assert main(["tokenizer", "encode", "--model", str(config), "hi"]) == 2
    assert f"tokenizer model '{config}' cannot be used: it is not a SentencePiece model" in one_error_line(capsys)
    assert main(["pretrain", "tiny", *SMALL, f"tokenizer.path={config}", f"train.run_dir={tmp_path / 'r'}"]) == 2
    assert "is not a SentencePiece model" in one_error_line(capsys)
    assert not (tmp_path / "r").exists()
    a_file = tmp_path / "taken"
    a_file.write_text("not a run")
    for run_dir, words in ((a_file, "is a file, not a directory"), (a_file / "sub", "lies under the file")):
        assert main(["pretrain", "tiny", *SMALL, f"train.run_dir={run_dir}"]) == 2
        assert words in one_error_line(capsys)
    assert a_file.read_text() == "not a run"


def test_damaged_run_metadata_names_its_file(tiny_run, tmp_path, capsys):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    meta = run / "checkpoints" / "2" / "meta" / "metadata"
    meta.write_text(meta.read_text()[:2000])  # cut inside a JSON string
    assert main(["generate", "--checkpoint", str(run), "--prompt", "x"]) == 2
    line = one_error_line(capsys)
    assert f"its run metadata in {meta.parent} cannot be read" in line and "restore the step" in line, line
    assert main(["generate", "--checkpoint", str(run), "--prompt", "x", "--step", "1", "--max-new-tokens", "2"]) == 0


def _qkv(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "qkv.cli", *args], env=env, timeout=600, **kw)


def test_closed_stdout_ends_generate_quietly(tiny_run):
    """`qkv generate ... | head -c 10`, with the reader gone before the first byte: exit 0, nothing on stderr."""
    for extra in ([], ["--no-stream"]):
        read, write = os.pipe()
        os.close(read)
        try:
            out = _qkv("generate", "--checkpoint", str(tiny_run), "--prompt", "def ", "--max-new-tokens", "4",
                       *extra, stdout=write, stderr=subprocess.PIPE, text=True)
        finally:
            os.close(write)
        assert out.returncode == 0 and out.stderr == "", out.stderr[-2000:]


def test_abandoned_orbax_reads_are_cancelled_before_their_loop_closes():
    """At the source: when one read of a gather fails, the others are cancelled and awaited (their finally
    blocks run) before Orbax closes its event loop, so nothing is left for the garbage collector to report."""
    import asyncio
    import gc

    from orbax.checkpoint._src import asyncio_utils

    from qkv.train.checkpoint import draining_event_loops

    cleaned, unraisable = [], []

    async def read(i):
        try:
            await asyncio.sleep(30)
        finally:
            cleaned.append(i)
            await asyncio.sleep(0)  # like orbax's `async with reserved_bytes(...)` exit

    async def broken():
        await asyncio.sleep(0.01)
        raise OSError("truncated file")

    async def restore():
        await asyncio.gather(broken(), *[read(i) for i in range(4)])

    previous = sys.unraisablehook
    sys.unraisablehook = unraisable.append
    try:
        with draining_event_loops(), pytest.raises(OSError, match="truncated"):
            asyncio_utils.run_sync(restore())
        assert sorted(cleaned) == [0, 1, 2, 3]
        gc.collect()
    finally:
        sys.unraisablehook = previous
    assert unraisable == []
