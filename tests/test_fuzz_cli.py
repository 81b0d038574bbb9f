"""Hypothesis fuzz of the CLI surface, in-process through qkv.cli.main.

Property: every command line ends with exit 0, or exit 2 and exactly one `qkv: error:` line on standard
error (no traceback), and writes no file outside the place it was asked to write (a refused first `pretrain`
leaves no run directory). An internal error (exit 1, `qkv: internal error`: an exception that is not a
UserError, e.g. a ValueError of a library, or a bug) fails the test and shows its traceback.

Examples are drawn deterministically (derandomize=True). The suite runs a small budget; set
QKV_FUZZ_EXAMPLES=N for N examples per property (docs/errors.md lists the figures of the last long run).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import io
import os
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from qkv.cli import main
from qkv.train.config import Config

BUDGET = int(os.environ.get("QKV_FUZZ_EXAMPLES", "0"))
FUZZ = settings(derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
TRIED: dict[str, int] = {}  # examples run per property, counted by check_outcome
EXPECTED: dict[str, int] = {}  # examples the properties that ran must have run


def counted(name: str, default: int):
    """Run a Hypothesis property with ``default`` (or QKV_FUZZ_EXAMPLES) examples, then check that it ran them
    all: a property that stops early, or whose examples never reach check_outcome, fails."""
    budget = BUDGET or default

    def wrap(test):
        test = settings(FUZZ, max_examples=budget)(test)

        @functools.wraps(test)
        def run(*args, **kwargs):
            before = TRIED.get(name, 0)
            test(*args, **kwargs)
            EXPECTED[name] = EXPECTED.get(name, 0) + budget
            assert TRIED.get(name, 0) - before == budget, (name, TRIED.get(name, 0) - before, budget)
        run.__signature__ = inspect.signature(test)  # the fixtures only, as Hypothesis shows them to pytest
        return run
    return wrap


def schema_keys(cls=Config, prefix: str = "") -> list[str]:
    """Every dotted key of the config schema (model.d_model, finetune.lora.rank, ...)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys += schema_keys(tp, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


KEYS = schema_keys()
AWKWARD_VALUES = st.one_of(
    st.sampled_from(["", " ", "-1", "0", "1", "2", "-0.0", "nan", ".nan", "inf", "-inf", ".inf", "1e308", "1e-320",
                     str(2**70), str(-2**70), "1e20", "true", "false", "null", "~", "[]", "{}", "[1, 2]", "{a: 1}",
                     "[", "{", "'", '"', "!!python/object/apply:os.system ['true']", "a: b: c", "- x", "0x10",
                     "0o17", "1_000", "ü", "\u202e", "日本語", "\x00", "\t", "yes", "no", "on", "2020-01-01",
                     "*alias", "&anchor x", "%TAG", "---", "...", "runs/x", "/", "..", "~/x", "{batch: 3}",
                     "[data, fsdp]", "{embed: null}", "cosine", "bpe", "decoder", "float32", "bfloat16"]),
    st.integers(min_value=-2**80, max_value=2**80).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=12),
)
OVERRIDE = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), AWKWARD_VALUES),  # real keys, awkward values
    st.builds(lambda k, v: f"{k}={v}", st.text(max_size=15), AWKWARD_VALUES),  # unknown or malformed keys
    st.sampled_from(["=", "==", "=1", ".=1", "..=1", "model=1", "model.=1", ".model.d_model=1", "model..d_model=1",
                     "model.d_model.x=1", "train", "train.steps", "model.d_model==3", " model.d_model = 3",
                     "finetune.lora=1", "finetune.lora.rank.x=1", "mesh.rules.batch=data"]),
    st.text(max_size=20),
)


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def traceback_of(err: str) -> str:
    """The traceback file an internal-error line names (qkv/cli.py writes it), for the failure message."""
    path = Path(err.split("the traceback is in ", 1)[-1].split("; ", 1)[0])
    return path.read_text() if path.is_file() else err


def check_outcome(name: str, argv: list[str], code: int, err: str) -> None:
    TRIED[name] = TRIED.get(name, 0) + 1
    assert code != 1 and "qkv: internal error" not in err, (argv, traceback_of(err))
    assert code in (0, 2), (argv, code, err)
    assert "Traceback" not in err, (argv, err)
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("qkv: error: "), (argv, lines)


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


@pytest.fixture
def sandbox(tmp_path, monkeypatch) -> Path:
    """An empty working directory (relative paths in overrides land here) and HOME."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return work


@counted("config overrides", 60)
@given(preset=st.sampled_from([[], ["tiny"], ["llama-8b"], ["translate-tiny"], ["bert-tiny"]]),
       overrides=st.lists(OVERRIDE, max_size=4))
def test_fuzz_config_overrides(sandbox, preset, overrides):
    before = files_under(sandbox.parent)
    code, out, err = run_cli(["config", *preset, *overrides])
    check_outcome("config overrides", ["config", *preset, *overrides], code, err)
    if code == 0:
        import yaml
        assert isinstance(yaml.safe_load(out), dict)
    assert files_under(sandbox.parent) == before


@counted("config file bytes", 25)
@given(content=st.one_of(st.binary(max_size=200),
                         st.text(max_size=200).map(str.encode),
                         st.lists(OVERRIDE, max_size=5).map(lambda xs: "\n".join(
                             "{}: {}".format(*(x.split("=", 1) if "=" in x else (x, ""))) for x in xs).encode()),
                         st.sampled_from([b"train:\n  steps: 3\n  steps: 4\n", b"train: [1]\n", b"model:\n",
                                          b"\xef\xbb\xbftrain: {steps: 3}\n", b"!!binary AAAA", b"a: &x 1\nb: *x\n",
                                          b"train: {steps: 1e3}\n", b"? [a]\n: 1\n", b"---\na: 1\n---\nb: 2\n"])))
def test_fuzz_config_file_bytes(sandbox, content):
    path = sandbox / "c.yaml"
    path.write_bytes(content)
    code, out, err = run_cli(["config", str(path)])
    check_outcome("config file bytes", ["config", repr(content)], code, err)


SAMPLING_FLAG = st.one_of(
    st.tuples(st.sampled_from(["--temperature", "--top-p", "--length-penalty"]),
              st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), AWKWARD_VALUES)),
    st.tuples(st.sampled_from(["--top-k", "--max-new-tokens", "--seed", "--beam-size", "--step"]),
              st.one_of(st.integers(min_value=-2**70, max_value=2**70).map(str), AWKWARD_VALUES)),
    st.tuples(st.sampled_from(["--prompt", "--no-stream", "--bogus", "-x", "--"]), AWKWARD_VALUES),
)


@counted("generate flags", 40)
@given(flags=st.lists(SAMPLING_FLAG, max_size=4), prompt=st.one_of(st.none(), st.binary(max_size=80)))
def test_fuzz_generate_flags_and_prompt_files(sandbox, flags, prompt):
    """Flags and prompt files are checked before the checkpoint is even looked for (it does not exist here)."""
    argv = ["generate", "--checkpoint", str(sandbox / "no-run"), "--prompt", "x"]
    if prompt is not None:
        (sandbox / "p.txt").write_bytes(prompt)
        argv += ["--prompt-file", str(sandbox / "p.txt")]
    for flag, value in flags:
        argv += [flag] if flag == "--no-stream" else [flag, value]
    before = files_under(sandbox.parent)
    code, _, err = run_cli(argv)
    check_outcome("generate flags", argv, code, err)
    assert code == 2  # never gets past the missing checkpoint
    assert files_under(sandbox.parent) == before


@counted("pretrain first start", 25)
@given(overrides=st.lists(OVERRIDE, max_size=4))
def test_fuzz_pretrain_refused_first_start_leaves_nothing(sandbox, overrides):
    """Whatever the overrides, this start must be refused (the corpus does not exist): nothing may be left,
    in particular no run directory, wherever train.run_dir points."""
    before = files_under(sandbox.parent)
    argv = ["pretrain", "tiny", *overrides, "data.source=files", f"data.path={sandbox / 'no-corpus'}",
            f"data.data_dir={sandbox.parent / 'cache'}", "train.progress=false", "model.kind=decoder",
            "finetune.method=sft"]
    code, _, err = run_cli(argv)
    check_outcome("pretrain first start", argv, code, err)
    assert code == 2
    assert files_under(sandbox.parent) == before, sorted(map(str, files_under(sandbox.parent) - before))


@counted("corpus bytes", 3)
@given(files=st.lists(st.binary(max_size=300), min_size=1, max_size=3))
def test_fuzz_corpus_bytes_through_tokenizer_training(sandbox, files):
    """Random bytes as a corpus: a tokenizer is trained, or the corpus is refused in one line."""
    corpus = sandbox / "corpus"
    corpus.mkdir(exist_ok=True)
    for old in corpus.iterdir():
        old.unlink()
    for i, data in enumerate(files):
        (corpus / f"{i}.txt").write_bytes(data)
    out_prefix = sandbox / "tok"
    Path(f"{out_prefix}.model").unlink(missing_ok=True)  # from an earlier example
    argv = ["tokenizer", "train", "--input", str(corpus), "--output", str(out_prefix), "--vocab-size", "300",
            "--documents", "5", "--data-dir", str(sandbox.parent / "cache")]
    code, _, err = run_cli(argv)
    check_outcome("corpus bytes", argv, code, err)
    if code == 2:
        assert not Path(f"{out_prefix}.model").exists()


def test_zz_report_fuzz_counts():
    """Every property that ran in this process ran all its examples (-s shows the counts). The tests of one
    file share a process (--dist=loadfile), so this sees the properties above."""
    print("\nfuzz examples tried:", TRIED)
    if not EXPECTED:
        pytest.skip("no fuzz property ran in this process (e.g. -k selected this test alone)")
    assert TRIED == EXPECTED
