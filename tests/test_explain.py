"""qkv explain: attention weights sown by the model's own forward pass, the next-token table against the
sampler, and the report for all three shapes (tiny runs of two training steps)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from qkv.cli import main
from qkv.inference.decode import filter_logits, sample_logits
from qkv.inference.explain import Inputs, forward_with_weights, make_batch, next_token_table
from qkv.model import ModelConfig, create_model, split_params

pytestmark = pytest.mark.slow  # trains, compiles or runs processes: deselect with -m 'not slow'

TINY = dict(vocab_size=61, d_model=16, n_layers=2, n_heads=4, d_ff=32, max_seq_len=16)
SHAPES = {"decoder": {}, "encoder": dict(positions="learned", norm="layernorm", norm_position="post", use_bias=True),
          "encoder_decoder": dict(positions="sinusoidal", norm="layernorm", norm_position="post", activation="relu")}


def _random_model(kind: str, **changes):
    cfg = ModelConfig(kind=kind, **{**TINY, **SHAPES[kind], **changes})
    graphdef, params = split_params(create_model(cfg, seed=3))
    return cfg, graphdef, params


def _batch(kind: str, t: int = 9, s: int = 7, pad: int = 0):
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 61, (2, t)).astype(np.int32)
    inputs = Inputs(tokens[0].tolist(), 0, rng.integers(5, 61, s).tolist() if kind == "encoder_decoder" else None)
    batch = make_batch(inputs)
    batch = {k: (np.repeat(v, 2, axis=0) if isinstance(v, np.ndarray) else v) for k, v in batch.items()}
    batch["inputs"] = tokens
    if pad:  # row 1: left padding in the decoder/encoder input, right padding in the source
        batch["segment_ids"] = batch["segment_ids"].copy()
        batch["segment_ids"][1, :pad] = 0
        if "src_segment_ids" in batch:
            batch["src_segment_ids"] = batch["src_segment_ids"].copy()
            batch["src_segment_ids"][1, -pad:] = 0
    return batch


@pytest.mark.parametrize("kind", list(SHAPES))
def test_sown_weights_come_from_the_ordinary_forward_pass(kind):
    cfg, graphdef, params = _random_model(kind)
    batch = _batch(kind)
    from flax import nnx
    plain = np.asarray(nnx.merge(graphdef, params).forward_batch(batch))
    logits, weights = forward_with_weights(graphdef, params, batch)
    np.testing.assert_allclose(logits, plain, rtol=1e-5, atol=1e-5)
    expected = {"decoder": {"self"}, "encoder": {"self"}, "encoder_decoder": {"self", "encoder", "cross"}}[kind]
    assert set(weights) == expected
    for name, w in weights.items():
        assert w.shape[:3] == (cfg.n_layers, 2, cfg.n_heads)
        np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
        assert (w >= 0).all()
        upper = np.triu(np.ones(w.shape[-2:], bool), 1)
        if name == "self" and kind != "encoder":
            assert (w[..., upper] == 0.0).all()  # exactly: the causal mask
        else:
            assert (w[..., upper] > 0).all()  # bidirectional and cross-attention see every key


def test_unrolled_layers_sow_the_same_weights():
    cfg, graphdef, params = _random_model("encoder_decoder")
    _, weights = forward_with_weights(graphdef, params, _batch("encoder_decoder"))
    _, graphdef_u, _ = _random_model("encoder_decoder", scan_layers=False)
    _, unrolled = forward_with_weights(graphdef_u, params, _batch("encoder_decoder"))
    for name in weights:
        np.testing.assert_allclose(unrolled[name], weights[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", list(SHAPES))
def test_padding_gets_no_attention(kind):
    _, graphdef, params = _random_model(kind)
    pad = 3
    _, weights = forward_with_weights(graphdef, params, _batch(kind, pad=pad))
    assert (weights["self"][:, 1, :, pad:, :pad] == 0.0).all()  # real queries never look at padding
    np.testing.assert_allclose(weights["self"][:, 1, :, pad:, pad:].sum(-1), 1.0, rtol=1e-5)
    if kind == "encoder_decoder":
        assert (weights["encoder"][:, 1, :, :-pad, -pad:] == 0.0).all()
        assert (weights["cross"][:, 1, :, pad:, -pad:] == 0.0).all()


def test_weights_equal_float64_numpy_softmax():
    """Layer 0 of a pre-norm decoder with learned positions and grouped-query attention (4 heads, 2 kv)."""
    cfg, graphdef, params = _random_model("decoder", positions="learned", n_kv_heads=2, use_bias=True)
    batch = _batch("decoder")
    _, weights = forward_with_weights(graphdef, params, batch)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    tokens = batch["inputs"]
    x = p["embed"][tokens] + p["pos_embed"][np.arange(tokens.shape[1])]
    layer = jax.tree.map(lambda a: a[0], p["blocks"])
    h = x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.norm_eps) * layer["attn_norm"]["scale"]
    attn = layer["attn"]
    q = np.einsum("btd,dhe->bthe", h, attn["wq"]) + attn["bq"]
    k = np.einsum("btd,dke->btke", h, attn["wk"]) + attn["bk"]
    k = np.repeat(k, cfg.n_heads // cfg.num_kv_heads, axis=2)  # query head i reads kv head i // group
    scores = np.einsum("bthe,bshe->bhts", q, k) / np.sqrt(cfg.head_size)
    t = tokens.shape[1]
    scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
    expected = np.exp(scores - scores.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    np.testing.assert_allclose(weights["self"][0], expected, rtol=1e-4, atol=1e-6)


class _Pieces:
    """Just enough of a tokenizer for the table: piece names, and its size."""

    def __init__(self, vocab_size: int = 40):
        self.vocab_size = vocab_size

    def id_to_piece(self, i):
        if not 0 <= i < self.vocab_size:
            raise IndexError(f"piece id {i} is out of range")  # as SentencePiece's id_to_piece
        return f"p{i}"


def _numpy_kept(logits, temperature, top_k, top_p):
    """Which tokens top-k then top-p keep, written independently of the sampler."""
    scaled = np.asarray(logits, np.float64) / temperature
    kept = np.ones(len(scaled), bool)
    if top_k:
        kept &= scaled >= np.sort(scaled)[::-1][top_k - 1]
    if top_p < 1.0:
        masked = np.where(kept, scaled, -np.inf)
        order = np.argsort(-masked, kind="stable")
        probs = np.exp(masked[order] - masked[order][0])
        probs /= probs.sum()
        n_keep = int(np.sum(np.cumsum(probs) - probs < top_p))
        kept &= masked >= masked[order][n_keep - 1]
    return kept


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.6), (0.5, 8, 0.9)])
def test_next_token_table_probabilities_and_marks(temperature, top_k, top_p):
    logits = np.random.default_rng(1).normal(0, 2, 40).astype(np.float32)
    table = next_token_table(logits, _Pieces(), k=40, temperature=temperature, top_k=top_k, top_p=top_p)
    x = logits.astype(np.float64)
    p1 = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    pt = np.exp(x / temperature - (x / temperature).max())
    pt /= pt.sum()
    kept = _numpy_kept(logits, temperature, top_k, top_p)
    rows = {r["id"]: r for r in table["rows"]}
    assert len(rows) == 40 and [r["rank"] for r in table["rows"]] == list(range(1, 41))
    for i in range(40):
        assert rows[i]["p_t1"] == pytest.approx(p1[i], rel=1e-5, abs=1e-9)
        assert rows[i]["p_temperature"] == pytest.approx(pt[i], rel=1e-5, abs=1e-9)
        assert rows[i]["kept"] == kept[i]
    assert table["kept"] == kept.sum()
    assert sum(r["p_sampled"] for r in table["rows"]) == pytest.approx(1.0, rel=1e-6)
    # and the sampler itself only ever draws kept tokens
    draws = {int(sample_logits(logits[None], jax.random.key(s), temperature, top_k, top_p)[0]) for s in range(60)}
    assert draws <= {i for i in range(40) if kept[i]}
    survivors = np.asarray(filter_logits(logits[None] / np.float32(temperature), top_k, top_p))[0]
    assert ((survivors > np.finfo(np.float32).min) == kept).all()


def test_next_token_table_leaves_out_ids_beyond_the_tokenizer():
    """A model vocabulary padded beyond the tokenizer's: the padding's logits (here the largest) are neither
    listed nor counted; the probabilities are those of the sampler, which never draws them (vocab_limit)."""
    logits = np.random.default_rng(2).normal(0, 2, 48).astype(np.float32)
    logits[40:] = 50.0
    table = next_token_table(logits, _Pieces(40), k=10, temperature=0.8, top_k=5)
    assert all(r["id"] < 40 for r in table["rows"]) and table["kept"] == 5
    np.testing.assert_allclose([r["p_t1"] for r in table["rows"]],
                               np.sort(np.exp(logits[:40] - logits[:40].max()) / np.exp(logits[:40] - logits[:40].max()).sum())[::-1][:10],
                               rtol=1e-6)


# ----------------------------------------------------------------------------------- reports from tiny runs
COMMON = ["train.steps=2", "train.log_every=1", "train.sample_tokens=0", "train.progress=false",
          "tokenizer.train_documents=40", "model.d_model=32", "model.n_layers=2", "model.n_heads=2",
          "model.d_ff=64", "model.vocab_size=512", "model.max_seq_len=32", "data.seq_len=32", "train.batch_size=8"]
RUNS = {
    "decoder": ("tiny", ["data.eval_batches=1", "data.validation_fraction=0.1", "train.eval_every=2"]),
    "encoder": ("bert-tiny", ["data.eval_batches=1", "data.validation_fraction=0.1", "model.dropout=0.0"]),
    "encoder_decoder": ("translate-tiny", ["model.vocab_size=384", "tokenizer.train_documents=600",
                                           "data.toy_limit=200", "data.source_seq_len=16", "data.eval_batches=0"]),
}


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("explain")
    out = {}
    for kind, (preset, extra) in RUNS.items():
        files = [] if kind == "encoder_decoder" else ["data.source=files", f"data.path={corpus}",
                                                      f"data.data_dir={root / 'tfds'}"]
        out[kind] = root / kind
        assert main(["pretrain", preset, *COMMON, *extra, *files, f"train.run_dir={out[kind]}"]) == 0
    return out


def _check_report(index: Path) -> dict:
    html = index.read_text(encoding="utf-8")
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert refs and all((index.parent / r).is_file() for r in refs), refs
    pngs = sorted(index.parent.glob("*.png"))
    assert {p.name for p in pngs} <= set(refs)
    for png in pngs:
        with Image.open(png) as image:
            image.verify()
            assert image.format == "PNG"
    return json.loads((index.parent / "explanation.json").read_text())


@pytest.mark.parametrize("kind,args", [
    ("decoder", ["--prompt", "def f(x):\n\treturn x", "--top-k", "5", "--top-p", "0.9", "--temperature", "0.7"]),
    ("encoder", ["--prompt", "import os", "--layer", "1"]),
    ("encoder_decoder", ["--prompt", "four hundred", "--source", "400", "--head", "1"]),
])
def test_report_for_each_shape(runs, tmp_path, capsys, kind, args):
    out = tmp_path / "report"
    assert main(["explain", "--checkpoint", str(runs[kind]), "--out", str(out), "--new-tokens", "4", *args]) == 0
    summary = capsys.readouterr().out
    assert "next token" in summary and str(out / "index.html") in summary
    numbers = _check_report(out / "index.html")
    assert numbers["kind"] == kind
    expected_pngs = {"next_token.png", "embeddings.png", "attention_self.png", "attention_self_detail.png"}
    if kind == "encoder_decoder":
        expected_pngs |= {"attention_cross.png", "attention_encoder.png"}
    assert expected_pngs <= {p.name for p in out.glob("*.png")}
    if kind == "decoder":
        assert any(t["byte"] for t in numbers["tokens"])  # the tab and newline are byte-fallback pieces here
        assert (out / "training.png").is_file() and numbers["training"]["steps"] == 2
    if kind == "encoder":
        assert "masked" in numbers["next_token"] and "kv_cache" not in numbers
    else:
        assert numbers["greedy_check"]["same"] is True
        rows = numbers["kv_cache"]["rows"]
        assert all(r["flops_without_cache"] >= r["flops_with_cache"] > 0 for r in rows)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".report")]  # no temporary folder left


def test_training_curves_alone(runs, tmp_path):
    assert main(["explain", "--run", str(runs["decoder"]), "--out", str(tmp_path / "curves")]) == 0
    assert _check_report(tmp_path / "curves" / "index.html")["training"]["steps"] == 2


def test_api_attention_and_next_token_table(runs):
    import qkv

    lm = qkv.load(runs["decoder"])
    w = lm.attention("x = 1")
    t = len(lm.prompt_ids(["x = 1"])[0])
    assert w.shape == (2, 2, t, t)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
    rows = lm.next_token_table("x = 1", k=3, temperature=0.5, top_k=2)
    logits = lm.logits(lm.prompt_ids(["x = 1"]))[0, -1]
    assert [r["id"] for r in rows] == list(np.argsort(-logits)[:3])
    assert [r["kept"] for r in rows] == [True, True, False]
    translator = qkv.load(runs["encoder_decoder"])
    cross = translator.attention("one", source="1", stack="cross")
    assert cross.shape[:2] == (2, 2) and cross.shape[-1] == len(translator.tokenizer.encode("1")) + 1


@pytest.mark.parametrize("name,argv,expected", [
    ("no-checkpoint", lambda r: ["--prompt", "x"], "no checkpoint"),
    ("missing-dir", lambda r: ["--checkpoint", str(r["decoder"]) + "-nope", "--prompt", "x"], "does not exist"),
    ("empty-prompt", lambda r: ["--checkpoint", str(r["decoder"]), "--prompt", ""], "empty prompt"),
    ("layer", lambda r: ["--checkpoint", str(r["decoder"]), "--prompt", "x", "--layer", "2"], "--layer 2"),
    ("head", lambda r: ["--checkpoint", str(r["encoder_decoder"]), "--prompt", "x", "--head", "7"], "--head 7"),
    ("too-long", lambda r: ["--checkpoint", str(r["decoder"]), "--prompt", "x = 1\n" * 40], "longer than"),
    ("position", lambda r: ["--checkpoint", str(r["encoder"]), "--prompt", "x", "--position", "0"], "--position"),
    ("top-p", lambda r: ["--checkpoint", str(r["decoder"]), "--prompt", "x", "--top-p", "0"], "top_p"),
])
def test_bad_input_is_one_line_and_leaves_no_report(runs, tmp_path, capsys, name, argv, expected):
    out = tmp_path / "report"
    capsys.readouterr()
    assert main(["explain", *argv(runs), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qkv: error: ") and expected in err[0], err
    assert list(tmp_path.iterdir()) == []


def _padded(lm, extra_of_each: int = 3):
    """``lm`` with its vocabulary grown beyond the tokenizer's by one row per tokenizer piece: row V + j is
    ``extra_of_each`` times row j (embedding and untied head alike), so each padding row is its piece's nearest
    neighbour and outscores it: ids the tokenizer cannot name, as in a padded vocabulary."""
    from dataclasses import replace

    from qkv.api import LanguageModel
    from qkv.model import abstract_model, logical_axes
    cfg, n = lm.config.model, lm.tokenizer.vocab_size
    bigger = replace(cfg, vocab_size=cfg.vocab_size + n)
    abstract = abstract_model(bigger)
    graphdef, _ = split_params(abstract)

    def grow(axes, x):
        if "vocab" not in axes:
            return x
        axis = axes.index("vocab")
        copies = extra_of_each * np.take(np.asarray(x), np.arange(n), axis=axis)
        return jax.numpy.asarray(np.concatenate([np.asarray(x), copies], axis=axis), x.dtype)
    params = jax.tree.map(grow, logical_axes(abstract), lm.params, is_leaf=lambda a: isinstance(a, tuple))
    return LanguageModel(replace(lm.config, model=bigger), lm.tokenizer, graphdef, params, lm.step)


def _ids(numbers: dict) -> list[int]:
    e, g = numbers["embeddings"], numbers.get("greedy_check") or {}
    return ([r["id"] for r in numbers["next_token"]["rows"]] + e["map"]["ids"]
            + [n["id"] for row in e["neighbours"] for n in row["neighbours"]] + g.get("cached", []) + g.get("uncached", []))


@pytest.mark.parametrize("kind,prompt,source", [("decoder", "def f(x):", None), ("encoder", "import os", None),
                                                ("encoder_decoder", "4721", None), ("encoder_decoder", "one", "1")])
def test_explain_a_model_vocabulary_larger_than_the_tokenizer(runs, kind, prompt, source):
    """Padding rows are no pieces: the explanation names only the tokenizer's ids, and it is the same as that of
    the model without them (the translation and greedy continuations too)."""
    import qkv

    lm = qkv.load(runs[kind])
    padded = _padded(lm)
    assert padded.config.model.vocab_size > lm.tokenizer.vocab_size
    settings = dict(source=source, new_tokens=3, neighbours=3, map_pieces=20)
    got, want = padded.explain(prompt, **settings).numbers, lm.explain(prompt, **settings).numbers
    assert max(_ids(got)) < lm.tokenizer.vocab_size
    assert _ids(got) == _ids(want) and got["target_text"] == want["target_text"]
    np.testing.assert_allclose([r["p_t1"] for r in got["next_token"]["rows"]],
                               [r["p_t1"] for r in want["next_token"]["rows"]], rtol=1e-4, atol=1e-7)
