"""The `qkv` command end to end (real subprocesses), and the table of bad inputs it must refuse."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qkv.cli import main

SMALL = ["model.vocab_size=512", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64",
         "model.max_seq_len=32", "data.seq_len=32", "train.batch_size=8", "data.eval_batches=2",
         "tokenizer.train_documents=40", "data.validation_fraction=0.1", "train.sample_tokens=8"]


def qkv(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "qkv.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


@pytest.fixture(scope="module")
def cli_run(corpus, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    out = qkv("pretrain", "tiny", *SMALL, "data.source=files", f"data.path={corpus}",
              f"data.data_dir={run_dir.parent / 'tfds'}", f"train.run_dir={run_dir}", "train.steps=20",
              "train.eval_every=10", "train.checkpoint_every=10")
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["step"] == 20 and summary["val_loss"] > 0
    assert "sample:" in out.stdout
    return run_dir


def test_pretrain_generate_evaluate(cli_run):
    assert (cli_run / "config.yaml").is_file() and (cli_run / "tokenizer.model").is_file()
    gen = qkv("generate", "--checkpoint", str(cli_run), "--prompt", "def ", "--max-new-tokens", "6",
              "--temperature", "0")
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert gen.stdout.startswith("def ")
    batch = qkv("generate", "--checkpoint", str(cli_run), "--prompt", "import", "--prompt", "class A:",
                "--max-new-tokens", "4", "--top-k", "5", "--top-p", "0.9")
    assert batch.returncode == 0 and batch.stdout.count("-" * 40) == 2
    beam = qkv("generate", "--checkpoint", str(cli_run), "--prompt", "def ", "--max-new-tokens", "4",
               "--beam-size", "3")
    assert beam.returncode == 0 and beam.stdout.startswith("def ") and beam.stdout.count("-" * 40) == 1, beam.stderr
    ev = qkv("evaluate", "--checkpoint", str(cli_run))
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert json.loads(ev.stdout.strip().splitlines()[-1])["step"] == 20


def test_tokenizer_commands(tmp_path, corpus):
    out = qkv("tokenizer", "train", "--output", str(tmp_path / "tok"), "--input", str(corpus),
              "--vocab-size", "400", "--documents", "20", "--data-dir", str(tmp_path / "tfds"))
    assert out.returncode == 0, out.stderr[-2000:]
    model = str(tmp_path / "tok.model")
    text = "def f(x):\n\treturn x  # ünïcödé ✓\n"
    enc = qkv("tokenizer", "encode", "--model", model, text)
    assert enc.returncode == 0
    dec = qkv("tokenizer", "decode", "--model", model, *enc.stdout.split())
    assert dec.stdout[:-1] == text  # decode prints the text and one newline


def _empty_corpus(tmp: Path) -> str:
    (tmp / "empty").mkdir(exist_ok=True)
    (tmp / "empty" / "a.txt").write_text("")
    return str(tmp / "empty")


def _bad_yaml(tmp: Path) -> str:
    (tmp / "bad.yaml").write_text("model: [unclosed\n")
    return str(tmp / "bad.yaml")


def _write(path: Path, content: str | bytes) -> str:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


def _jsonl(path: Path, lines: list[str]) -> str:
    return "data.path=" + _write(path, "".join(line + "\n" for line in lines))


def _damaged_run(tmp: Path) -> str:
    """A copy of the trained run whose only checkpoint lost one parameter file."""
    import shutil
    target = tmp / "damaged"
    if not target.exists():
        shutil.copytree(tmp / "shape", target)
        step = next(p for p in (target / "checkpoints").iterdir() if p.name.isdigit())
        data = sorted(p for p in (step / "params").rglob("*") if p.is_file() and p.parent.name == "d")
        data[0].unlink()
    return str(target)


def _fresh_pretrain(t: Path, r: Path, *extra: str) -> list[str]:
    return ["pretrain", "tiny", *SMALL, "data.source=files", f"data.path={r}", f"data.data_dir={t / 'd'}",
            f"train.run_dir={t / 'fresh'}", *extra]


# (case id, argv builder, words the one-line message must contain)
BAD_INPUTS = [
    ("unknown-key", lambda t, r: ["pretrain", "model.d_modl=3"], "did you mean model.d_model"),
    ("wrong-type", lambda t, r: ["pretrain", "train.steps=many"], "train.steps"),
    ("bad-choice", lambda t, r: ["pretrain", "model.norm=batchnorm"], "layernorm"),
    ("override-syntax", lambda t, r: ["pretrain", "tiny", "train.steps"], "section.key=value"),
    ("missing-config-file", lambda t, r: ["pretrain", str(t / "nope.yaml")], "neither a preset"),
    ("invalid-yaml", lambda t, r: ["pretrain", _bad_yaml(t)], "not valid YAML"),
    ("gqa-heads", lambda t, r: ["pretrain", "model.n_kv_heads=3"], "model.n_kv_heads"),
    ("seq-over-context", lambda t, r: ["pretrain", "data.seq_len=4096"], "model.max_seq_len"),
    ("negative-dropout", lambda t, r: ["pretrain", "model.dropout=-0.1"], "model.dropout"),
    ("files-without-path", lambda t, r: ["pretrain", "data.source=files"], "data.path"),
    ("mesh-two-free-axes", lambda t, r: ["pretrain", "mesh.fsdp=-1", f"train.run_dir={t / 'r'}",
                                         f"data.data_dir={t / 'd'}", "data.source=files", f"data.path={r}"],
     "only one mesh axis"),
    ("missing-corpus", lambda t, r: ["pretrain", "data.source=files", f"data.path={t / 'nothing'}",
                                     f"data.data_dir={t / 'd'}", f"train.run_dir={t / 'r'}"], "nothing"),
    ("empty-corpus", lambda t, r: ["pretrain", "data.source=files", f"data.path={_empty_corpus(t)}",
                                   f"data.data_dir={t / 'd'}", f"train.run_dir={t / 'r'}"], "empty"),
    ("missing-tokenizer", lambda t, r: ["pretrain", "tokenizer.path=/no/such.model", "data.source=files",
                                        f"data.path={r}", f"data.data_dir={t / 'd'}", f"train.run_dir={t / 'r'}"],
     "tokenizer.path"),
    ("different-model-shape", lambda t, r: ["pretrain", "tiny", *SMALL, "model.d_model=64", "data.source=files",
                                            f"data.path={r}", f"train.run_dir={t / 'shape'}"], "model.d_model=32"),
    ("generate-no-checkpoint", lambda t, r: ["generate", "--checkpoint", str(t / "none"), "--prompt", "x"],
     "does not exist"),
    ("generate-no-prompt", lambda t, r: ["generate", "--checkpoint", str(t / "shape")], "no prompt"),
    ("top-p-zero", lambda t, r: ["generate", "--checkpoint", str(t / "shape"), "--prompt", "x", "--top-p", "0"],
     "top_p"),
    ("top-p-above-one", lambda t, r: ["generate", "--checkpoint", str(t / "shape"), "--prompt", "x",
                                      "--top-p", "1.5"], "top_p"),
    ("negative-temperature", lambda t, r: ["generate", "--checkpoint", str(t / "shape"), "--prompt", "x",
                                           "--temperature", "-1"], "temperature"),
    ("negative-top-k", lambda t, r: ["generate", "--checkpoint", str(t / "shape"), "--prompt", "x",
                                     "--top-k", "-2"], "top_k"),
    ("empty-prompt", lambda t, r: ["generate", "--checkpoint", str(t / "shape"), "--prompt", ""], "empty prompt"),
    ("prompt-over-context", lambda t, r: ["generate", "--checkpoint", str(t / "shape"), "--prompt",
                                          "x = 1\n" * 200], "context"),
    ("evaluate-no-checkpoint", lambda t, r: ["evaluate", "--checkpoint", str(t / "none")], "does not exist"),
    ("decode-bad-id", lambda t, r: ["tokenizer", "decode", "--model", str(t / "shape" / "tokenizer.model"),
                                    "99999"], "outside the vocabulary"),
    ("decode-not-int", lambda t, r: ["tokenizer", "decode", "--model", str(t / "shape" / "tokenizer.model"),
                                     "abc"], "integer token ids"),
    ("tokenizer-missing-model", lambda t, r: ["tokenizer", "encode", "--model", str(t / "no.model"), "x"],
     "does not exist"),
    # configs: unknown section, impossible values, not a mapping, a directory
    ("unknown-section", lambda t, r: ["pretrain", "optimizer.learning_rate=1e-3"], "did you mean optim"),
    ("zero-steps", lambda t, r: ["pretrain", "train.steps=0"], "train.steps=0 must be a positive integer"),
    ("config-not-a-mapping", lambda t, r: ["pretrain", _write(t / "list.yaml", "- a\n- b\n")], "must be a mapping"),
    ("config-is-a-directory", lambda t, r: ["pretrain", str(t)], "neither a preset"),
    ("skip-nonfinite-not-bool", lambda t, r: ["pretrain", "train.skip_nonfinite=maybe"], "train.skip_nonfinite"),
    # corpora: JSONL with a malformed line, a record without the text field
    ("jsonl-malformed-line", lambda t, r: [*_fresh_pretrain(t, r), "data.source=jsonl",
                                           _jsonl(t / "bad.jsonl", ['{"text": "a"}', '{"text": '])],
     ":2: malformed JSON line"),
    ("jsonl-missing-field", lambda t, r: [*_fresh_pretrain(t, r), "data.source=jsonl",
                                          _jsonl(t / "field.jsonl", ['{"body": "a"}'])], "data.text_field"),
    # tokenizer larger than the model's vocabulary
    ("tokenizer-over-vocab", lambda t, r: _fresh_pretrain(t, r, f"tokenizer.path={t / 'shape' / 'tokenizer.model'}",
                                                          "model.vocab_size=300"), "pieces but model.vocab_size=300"),
    # checkpoints: a damaged step (a parameter file deleted)
    ("evaluate-damaged-checkpoint", lambda t, r: ["evaluate", "--checkpoint", _damaged_run(t)], "is damaged"),
    ("generate-damaged-checkpoint", lambda t, r: ["generate", "--checkpoint", _damaged_run(t), "--prompt", "x"],
     "is damaged"),
    # prompts and sampling
    ("empty-prompt-file", lambda t, r: ["generate", "--checkpoint", str(t / "shape"), "--prompt-file",
                                        _write(t / "empty.txt", "\n\n")], "no prompt"),
    ("zero-new-tokens", lambda t, r: ["generate", "--checkpoint", str(t / "shape"), "--prompt", "x",
                                      "--max-new-tokens", "0"], "max_new_tokens"),
]


@pytest.fixture(scope="module")
def trained_shape_run(corpus, tmp_path_factory) -> Path:
    """A small trained run in <tmp>/shape that the generate/decode cases point at."""
    tmp = tmp_path_factory.mktemp("bad")
    assert main(["pretrain", "tiny", *SMALL, "train.steps=2", "train.sample_tokens=0", "train.progress=false",
                 "data.source=files", f"data.path={corpus}", f"data.data_dir={tmp / 'd'}",
                 f"train.run_dir={tmp / 'shape'}"]) == 0
    return tmp


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_clear_line(case, trained_shape_run, corpus, capsys):
    _, argv, expected = case
    args = argv(trained_shape_run, corpus)
    run_dirs = [Path(a.split("=", 1)[1]) for a in args if a.startswith("train.run_dir=")]
    new_dirs = [d for d in run_dirs if not d.exists()]
    capsys.readouterr()
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("qkv: error: "), err
    assert expected in err[0], err[0]
    for d in new_dirs:  # a refused first start leaves no half-made run directory behind
        assert not d.exists(), sorted(p.name for p in d.iterdir())
