"""The documentation states what the code does: the README's preset table and default-run figures are read
from the presets themselves, the package metadata builds without deprecation warnings, and the docs describe
the product (no project history, no scratch paths)."""
from __future__ import annotations

import re
import tomllib
import warnings
from pathlib import Path

import pytest

from qkv.model import abstract_model, count_params
from qkv.train.config import load_config, preset_names

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
UNITS = {"K": 1e3, "M": 1e6, "B": 1e9}


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n#", start + len(heading))
    return text[start:end if end > 0 else None]


def _preset_rows() -> dict[str, tuple[str, str]]:
    rows = re.findall(r"^\| `([\w.-]+)` \| ([\d.]+[KMB]) \| (.+) \|$", _section(README, "### Presets"), re.M)
    return {name: (size, shape) for name, size, shape in rows}


def test_the_readme_names_every_preset():
    table = _preset_rows()
    finetune = set(re.findall(r"`([\w-]+)`", _section(README, "The fine-tuning presets").split("\n\n")[0]))
    assert set(preset_names()) == set(table) | (finetune & set(preset_names())), (sorted(table), sorted(finetune))


@pytest.mark.parametrize("name", sorted(_preset_rows()))
def test_the_readme_preset_table_is_the_presets(name):
    """Size to the digits written; layers, width, heads, vocabulary and steps where the row states them."""
    size, shape = _preset_rows()[name]
    cfg = load_config(name)
    m = cfg.model
    n = count_params(abstract_model(m))
    value, unit = float(size[:-1]), UNITS[size[-1]]
    digits = len(size[:-1].split(".")[1]) if "." in size else 0
    assert abs(n / unit - value) <= 0.5 * 10 ** -digits, (name, n, size)
    if found := re.search(r"(\d+)\+(\d+) layers", shape):
        assert (int(found[1]), int(found[2])) == (m.encoder_layers, m.n_layers), shape
    elif found := re.search(r"(\d+) layers", shape):
        assert int(found[1]) == m.n_layers, shape
    if found := re.search(r"\bd=(\d+)", shape):
        assert int(found[1]) == m.d_model, shape
    if found := re.search(r"(\d+)/(\d+) GQA heads", shape):
        assert (int(found[1]), int(found[2])) == (m.n_heads, m.num_kv_heads), shape
    elif found := re.search(r"(\d+) heads", shape):
        assert int(found[1]) == m.n_heads, shape
    if found := re.search(r"(\d+)k vocabulary", shape):
        assert int(found[1]) * 1024 == m.vocab_size, shape
    if found := re.search(r"(\d+) steps", shape):
        assert int(found[1]) == cfg.train.steps, shape
    if found := re.search(r"(\d+) positions", shape):
        assert int(found[1]) == m.max_seq_len, shape


def test_the_readme_default_run_is_the_tiny_preset():
    text = " ".join(_section(README, "## What the default run does").split())
    cfg = load_config("tiny")
    m, t = cfg.model, cfg.train
    n = count_params(abstract_model(m))
    assert f"{n / 1e6:.1f}M-parameter decoder ({m.n_layers} layers, d={m.d_model}, {m.n_heads} heads of " \
           f"{m.d_model // m.n_heads}" in text
    assert f"{m.vocab_size // 1024}k BPE tokenizer on {cfg.tokenizer.train_documents} of them" in text
    assert f"for {t.steps} steps of {t.batch_size}×{cfg.data.seq_len} tokens" in text
    assert f"one shuffled window of {cfg.data.shuffle_rows} rows" in text
    assert f"at steps {t.eval_every} and {t.steps}" in text and t.steps == 2 * t.eval_every
    assert f"train loss (step 10 → {t.steps})" in text and f"at step {t.steps} |" in text
    assert f"checkpoints to `{t.run_dir}/`" in text
    assert cfg.optim.name == "muon" and "with Muon for the hidden weight matrices" in text


def test_package_metadata_has_an_spdx_license_and_no_deprecation_warning():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert isinstance(project["project"]["license"], str), "license = \"SPDX expression\" (PEP 639)"
    assert any(re.fullmatch(r"setuptools>=(\d+)", r) and int(r.split(">=")[1]) >= 77
               for r in project["build-system"]["requires"]), "the SPDX string form needs setuptools >= 77"
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} here; the build installs >= 77 (build-system.requires)")
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_configuration(Distribution(), ROOT / "pyproject.toml")
    assert not [w for w in caught if "deprecat" in str(w.message).lower()], [str(w.message)[:200] for w in caught]


# Words that tell the project's history rather than the product: ticket numbers, who did what in which sitting,
# machines borrowed or not, scratch paths (written with character classes so this file does not match itself).
HISTORY = re.compile(r"issue [0-9]|issue[']s|\bsess[i]ons?\b|\bl[e]nt\b|/t[m]p/", re.I)
FILES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*")
                              if p.suffix in (".md", ".py", ".json", ".jsonl")),
         *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("*.py"))]


@pytest.mark.parametrize("name", FILES)
def test_docs_describe_the_product_not_its_history(name):
    text = (ROOT / name).read_text(encoding="utf-8")
    hits = [line.strip()[:160] for line in text.splitlines()
            if HISTORY.search(line.replace('scope="session"', ""))]  # pytest's fixture scope is no history
    assert not hits, hits
