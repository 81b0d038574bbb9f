"""Training the other two shapes end to end: MLM pretraining, classification fine-tuning, translation.

Real components throughout: SentencePiece tokenizers trained in the run, Orbax checkpoints, the CLI.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qkv.cli import main as cli_main
from qkv.inference.report import pretrain_report
from qkv.train import checkpoint
from qkv.train.config import MeshConfig, load_config
from qkv.train.loop import pretrain
from qkv.train.mlm import FIRST_REGULAR_ID, mlm_corrupt
from qkv.train.sharding import make_mesh, resolve_rules
from qkv.train.objectives import token_losses
from qkv.train.step import Trainer
from qkv.train.tasks import task_for

pytestmark = pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")

# A small modern encoder-decoder (pre-norm, RoPE, SwiGLU) on the toy task's numbers below 1000.
TRANSLATE = ["model.d_model=64", "model.d_ff=256", "model.vocab_size=384", "model.max_seq_len=32",
             "model.norm_position=pre", "model.positions=rope", "model.activation=swiglu", "model.norm=rmsnorm",
             "data.toy_limit=1000", "data.source_seq_len=16", "data.seq_len=32", "data.eval_batches=0",
             "train.batch_size=16", "optim.learning_rate=3e-3", "optim.warmup_steps=30",
             "tokenizer.train_documents=600", "train.progress=false", "train.eval_every=1000",
             "train.checkpoint_every=1000"]
BERT = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64", "model.vocab_size=512",
        "model.max_seq_len=32", "data.seq_len=32", "data.eval_batches=2", "train.batch_size=8",
        "tokenizer.train_documents=40", "train.progress=false", "model.dropout=0.0"]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli_main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------- MLM corruption and losses


def test_mlm_masking_proportions_and_only_masked_positions_carry_loss():
    b, t, vocab = 64, 256, 1000
    rng = np.random.default_rng(0)
    tokens = rng.integers(FIRST_REGULAR_ID, vocab, (b, t)).astype(np.int32)
    tokens[:, 0] = 2  # bos: never picked
    segments = np.ones((b, t), np.int32)
    segments[:, -32:] = 0  # padding: never picked
    batch = {"inputs": tokens, "segment_ids": segments, "targets": np.zeros_like(tokens),
             "loss_mask": np.ones_like(tokens)}
    out = jax.tree.map(np.asarray, jax.jit(lambda bt, k: mlm_corrupt(bt, k, mask_id=4, vocab_size=vocab))(
        batch, jax.random.key(1)))
    picked = out["loss_mask"].astype(bool)
    eligible = (segments > 0) & (tokens >= FIRST_REGULAR_ID)
    assert not picked[~eligible].any()
    rate = picked.sum() / eligible.sum()
    n = picked.sum()
    masked = (out["inputs"] == 4) & picked
    kept = (out["inputs"] == tokens) & picked
    randomised = picked & ~masked & ~kept
    # binomial tolerances of about 4 standard deviations
    assert abs(rate - 0.15) < 4 * math.sqrt(0.15 * 0.85 / eligible.sum()), rate
    for share, want in ((masked.sum() / n, 0.8), (randomised.sum() / n, 0.1), (kept.sum() / n, 0.1)):
        assert abs(share - want) < 4 * math.sqrt(want * (1 - want) / n) + 0.01, (share, want)  # random may equal kept
    np.testing.assert_array_equal(out["inputs"][~picked], tokens[~picked])  # untouched elsewhere
    np.testing.assert_array_equal(out["targets"], tokens)  # targets: the original tokens
    assert (out["inputs"][randomised] >= FIRST_REGULAR_ID).all() and (out["inputs"][randomised] < vocab).all()


def test_mlm_evaluation_masks_each_batch_afresh_and_every_evaluation_alike():
    cfg = load_config("bert-tiny", ["model.vocab_size=64", "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
                                    "model.d_ff=64", "model.max_seq_len=32", "data.seq_len=32", "train.batch_size=8"])
    trainer = Trainer(cfg.model, cfg.optim, make_mesh(MeshConfig(), jax.devices()[:1]), resolve_rules({}), 10,
                      objective=task_for(cfg).objective())
    params = trainer.init_state()["params"]
    rng = np.random.default_rng(0)
    batch = trainer.put_batch({"inputs": rng.integers(5, 64, (8, 32)).astype(np.int32),
                               "targets": np.zeros((8, 32), np.int32), "loss_mask": np.ones((8, 32), np.int32),
                               "segment_ids": np.ones((8, 32), np.int32),
                               "positions": np.tile(np.arange(32, dtype=np.int32), (8, 1))})
    first, again, second = (jax.device_get(trainer.eval_step(params, batch, i)) for i in (0, 0, 1))
    assert first == again  # batch i is masked the same way at every evaluation
    assert (first["tokens"], first["loss_sum"]) != (second["tokens"], second["loss_sum"])  # batch 1 differs
    assert 0.05 * 256 < first["tokens"] < 0.3 * 256


def test_label_smoothing_equals_float64_reference():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 3, 7)) * 3
    targets = rng.integers(0, 7, (2, 3))
    eps = 0.1
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    q = np.full((2, 3, 7), eps / 7)
    q[np.arange(2)[:, None], np.arange(3)[None], targets] += 1 - eps
    want = -(q * log_p).sum(-1)
    got = token_losses(jnp.asarray(logits, jnp.float32), jnp.asarray(targets), label_smoothing=eps)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- all three shapes on a mesh


def _mesh_batch(kind: str, b: int = 8, t: int = 16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    toks = rng.integers(5, 64, (b, t + 1)).astype(np.int32)
    segments = np.ones((b, t), np.int32)
    segments[1, 10:] = 2  # a packed second example in row 1
    positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()
    batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": segments, "positions": positions,
             "loss_mask": segments > 0}
    if kind == "encoder_decoder":
        batch.update(src_inputs=toks[:, 1:], src_segment_ids=segments, src_positions=positions)
    return {k: np.asarray(v, np.int32) for k, v in batch.items()}


@pytest.mark.parametrize("kind", ["encoder", "encoder_decoder"])
def test_sharded_train_step_matches_one_device(kind):
    cfg = load_config("tiny", ["model.vocab_size=64", "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
                               "model.n_kv_heads=2", "model.d_ff=64", "model.max_seq_len=16", "data.seq_len=16",
                               "train.batch_size=8", f"model.kind={kind}", "optim.label_smoothing=0.1"])
    losses = {}
    for name, mesh_cfg, devices in (("one", MeshConfig(), jax.devices()[:1]),
                                    ("mesh", MeshConfig(data=2, fsdp=2, tensor=2), None)):
        trainer = Trainer(cfg.model, cfg.optim, make_mesh(mesh_cfg, devices), resolve_rules({}), 10)
        state = trainer.init_state()
        for _ in range(2):
            state, m = trainer.train_step(state, trainer.put_batch(_mesh_batch(kind)))
        losses[name] = float(m["loss"])
    assert losses["one"] == pytest.approx(losses["mesh"], abs=1e-5), losses


# ----------------------------------------------------------------------------- translation end to end


@pytest.fixture(scope="module")
def translator(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("translate") / "run"
    # 250 steps: held-out exact match 1.0 (greedy, and 8 of 8 with beams) on a 2-core AMD EPYC, 2026-12-05;
    # 150 steps gave 0.89 and 6 of 8, so the thresholds below (0.6, 4 of 8) keep a wide margin
    cfg = load_config("translate-tiny", [*TRANSLATE, "train.steps=250", f"train.run_dir={run_dir}",
                                         "train.log_every=50"])
    summary = pretrain(cfg, report=pretrain_report(cfg))  # the report is the caller's (qkv.pretrain, qkv pretrain)
    assert summary["exact_match"] >= 0.6, summary  # held-out validation numbers, greedy, from the run's report
    return run_dir


def test_tiny_translator_reproduces_held_out_targets(translator, capsys):
    losses = [r["loss"] for r in metrics(translator) if r["split"] == "train"]
    assert losses[-1] < losses[0] / 2
    # the test split: numbers never seen in training, translated greedily and with beams
    code, out, _ = run_cli(capsys, "evaluate", "--checkpoint", str(translator), "--split", "test")
    result = json.loads(out)
    assert code == 0 and result["split"] == "test" and result["bleu_pairs"] > 30 and result["accuracy"] > 0.9
    from qkv.api import load
    from qkv.data import number_to_words, toy_pairs
    lm = load(translator)
    test = toy_pairs("test", 1000)
    greedy = lm.generate([p.source for p in test], temperature=0.0, max_new_tokens=32)
    assert sum(g == p.target for g, p in zip(greedy, test)) >= 0.6 * len(test)
    beams = lm.generate([p.source for p in test[:8]], beam_size=3, max_new_tokens=32)
    assert sum(b == p.target for b, p in zip(beams, test)) >= 4
    code, out, _ = run_cli(capsys, "generate", "--checkpoint", str(translator), "--prompt", test[0].source,
                           "--temperature", "0")
    assert code == 0 and out.startswith(f"{test[0].source}\t") and number_to_words(int(test[0].source))


def test_translation_resume_is_exact(tmp_path):
    common = [*TRANSLATE, "data.toy_limit=100", "train.steps=8", "train.log_every=1", "train.sample_tokens=0"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    pretrain(load_config("translate-tiny", [*common, f"train.run_dir={straight}"]))
    pretrain(load_config("translate-tiny", [*common, f"train.run_dir={split}", "train.stop_at_step=3"]))
    pretrain(load_config("translate-tiny", [*common, f"train.run_dir={split}"]))
    a = [r["loss"] for r in metrics(straight) if r["split"] == "train"]
    b = [r["loss"] for r in metrics(split) if r["split"] == "train"]
    assert len(a) == 8 and a == b  # bit-identical, packed data order included


# ----------------------------------------------------------------------------- encoder: MLM, then a classifier


@pytest.fixture(scope="module")
def bert_run(corpus, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("bert") / "mlm"
    pretrain(load_config("bert-tiny", [*BERT, "data.source=files", f"data.path={corpus}",
                                       f"data.data_dir={run_dir.parent / 'tfds'}", "data.validation_fraction=0.1",
                                       f"train.run_dir={run_dir}", "train.steps=30", "train.log_every=5",
                                       "train.eval_every=30", "optim.learning_rate=5e-3", "optim.warmup_steps=5"]))
    return run_dir


def test_mlm_pretraining_learns_and_checkpoints(bert_run, capsys):
    records = metrics(bert_run)
    train = [r["loss"] for r in records if r["split"] == "train"]
    assert train[-1] < train[0] - 0.5, train
    # tokens_per_s: every token processed; loss_tokens_per_s: the ~15 % masked ones the loss counts
    assert all(r["tokens_per_s"] > 3 * r["loss_tokens_per_s"] > 0 for r in records if r["split"] == "train")
    from qkv.data import Tokenizer
    meta = checkpoint.read_meta(bert_run)
    assert Tokenizer.from_bytes(checkpoint.decode_tokenizer(meta["tokenizer"])).mask_id == 4
    code, out, err = run_cli(capsys, "generate", "--checkpoint", str(bert_run), "--prompt", "x")
    assert code == 2 and "encoder-only model: it reads text but does not generate it" in err
    code, out, _ = run_cli(capsys, "embed", "--checkpoint", str(bert_run), "--text", "import os", "--text",
                           "import sys", "--text", "x = [1, 2, 3]", "--neighbours", "1")
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(rows) == 3 and all(-1 <= r["neighbours"][0]["cosine"] <= 1 for r in rows)
    # sentence embeddings: the mean of the encoder's output vectors; neighbours: cosine, computed here in NumPy
    from qkv.api import load
    lm = load(bert_run)
    texts = ["import os", "import sys", "x = [1, 2, 3]", "def f(): pass"]
    vectors = lm.embed(texts).astype(np.float64)
    unit = vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)
    cos = unit @ unit.T
    for i, near in enumerate(lm.neighbours(texts, k=2)):
        others = sorted((j for j in range(4) if j != i), key=lambda j: -cos[i, j])[:2]
        assert [t for t, _ in near] == [texts[j] for j in others]
        np.testing.assert_allclose([c for _, c in near], [cos[i, j] for j in others], rtol=1e-5)
    # word neighbours: nearest rows of the input embedding table, the word's own pieces and specials left out
    (near,) = lm.word_neighbours(["import"], k=3)
    table = np.asarray(lm.params["embed"], np.float64)
    ids = lm.tokenizer.encode("import")
    table_unit = table / np.linalg.norm(table, axis=-1, keepdims=True)
    query = table_unit[ids].mean(0)
    want = table_unit @ (query / np.linalg.norm(query))
    want[ids], want[:5] = -np.inf, -np.inf
    np.testing.assert_allclose([c for _, c in near], np.sort(want)[::-1][:3], rtol=1e-5)


def test_validation_batches_are_tokenized_once_per_run(bert_run, corpus):
    """Evaluation reuses the batches it built the first time (the same arrays, no new tokenizing);
    with data.eval_batches=0 it streams the whole split again instead of holding it."""
    from qkv.data import Tokenizer
    from qkv.train.tasks import task_for

    tok = Tokenizer.load(bert_run / "tokenizer.model")
    calls = []

    class Counting:
        def __getattr__(self, name):
            return getattr(tok, name)

        def encode(self, text):
            calls.append(1)
            return tok.encode(text)

    common = [*BERT, "data.source=files", f"data.path={corpus}", f"data.data_dir={bert_run.parent / 'tfds'}",
              "data.validation_fraction=0.1"]
    task = task_for(load_config("bert-tiny", common))
    source = task.open("validation")
    first = list(task.eval_batches(Counting(), source))
    encoded = len(calls)
    again = list(task.eval_batches(Counting(), source))
    assert encoded > 0 and len(calls) == encoded and len(first) == len(again) == 2
    assert all(a is b for x, y in zip(first, again) for a, b in zip(x.values(), y.values()))

    whole = task_for(load_config("bert-tiny", [*common, "data.eval_batches=0"]))
    calls.clear()
    n = len(list(whole.eval_batches(Counting(), source)))
    streamed = len(calls)
    assert n > 2 and streamed >= len(source)
    list(whole.eval_batches(Counting(), source))
    assert len(calls) >= streamed + len(source)  # every document encoded again


def _labeled(path: Path, n: int, seed: int, labels=("pos", "neg")) -> Path:
    rng = np.random.default_rng(seed)
    words = {"pos": "good great fine nice".split(), "neg": "bad awful poor sad".split(), "meh": ["okay"]}
    filler = "the a film plot was very it and".split()
    with open(path, "w") as f:
        for _ in range(n):
            label = labels[rng.integers(len(labels))]
            text = list(rng.choice(filler, 4)) + [rng.choice(words[label])]
            rng.shuffle(text)
            f.write(json.dumps({"text": " ".join(text), "label": label}) + "\n")
    return path


def test_classifier_learns_a_separable_task_and_evaluates(bert_run, tmp_path, capsys):
    train, evals = _labeled(tmp_path / "train.jsonl", 200, 0), _labeled(tmp_path / "eval.jsonl", 64, 1)
    run_dir = tmp_path / "cls"
    code, out, err = run_cli(capsys, "finetune", "finetune.method=classify", f"finetune.init_from={bert_run}",
                             f"finetune.train_path={train}", f"finetune.eval_path={evals}", f"train.run_dir={run_dir}",
                             "train.steps=40", "train.eval_every=40", "train.batch_size=16", "data.seq_len=16",
                             "optim.learning_rate=3e-3", "optim.warmup_steps=5", "train.progress=false")
    assert code == 0, err
    code, out, _ = run_cli(capsys, "evaluate", "--checkpoint", str(run_dir))
    result = json.loads(out)
    assert result["labels"] == ["neg", "pos"] and result["tokens"] == 64 and result["accuracy"] >= 0.9, result
    from qkv.api import load
    assert load(run_dir).classify(["good good good", "bad bad bad"]) == ["pos", "neg"]
    # the encoder was loaded (not re-initialised): its embeddings moved only by fine-tuning, the head is new
    base = checkpoint.restore(bert_run, {"params": _params_abstract(bert_run)}, with_optimizer=False)[0]["params"]
    tuned = checkpoint.restore(run_dir, {"params": _params_abstract(run_dir)}, with_optimizer=False)[0]["params"]
    assert "cls_head" in tuned and "cls_head" not in base
    drift = np.abs(np.asarray(tuned["embed"]) - np.asarray(base["embed"])).max()
    assert 0 < drift < 0.5 * np.abs(np.asarray(base["embed"])).max()


def _params_abstract(run_dir: Path):
    from qkv.train.config import config_from_dict
    from qkv.train.step import abstract_params
    cfg = config_from_dict(checkpoint.read_meta(run_dir)["config"])
    return abstract_params(cfg.model, make_mesh(MeshConfig()), resolve_rules({}))[1]


# ----------------------------------------------------------------------------- bad input


def test_shape_specific_bad_input_is_one_line(bert_run, translator, corpus, tmp_path, capsys):
    src, tgt = tmp_path / "train.src", tmp_path / "train.tgt"
    src.write_text("1\n2\n3\n")
    tgt.write_text("one\ntwo\n")
    never = tmp_path / "never"
    code, _, err = run_cli(capsys, "pretrain", "translate-tiny", *TRANSLATE, "data.source=pairs", f"data.path={src}",
                           f"data.target_path={tgt}", f"train.run_dir={never}")
    assert code == 2 and "has 3 lines but" in err and len(err.strip().splitlines()) == 1, err
    assert not never.exists()
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("1\tone\n\t\n2\t\n")
    code, _, err = run_cli(capsys, "pretrain", "translate-tiny", *TRANSLATE, "data.source=pairs", f"data.path={tsv}",
                           f"train.run_dir={never}")
    assert code == 2 and "pairs.tsv:3" in err and "empty" in err and len(err.strip().splitlines()) == 1, err
    train = _labeled(tmp_path / "t.jsonl", 20, 0)
    bad = _labeled(tmp_path / "e.jsonl", 5, 1, labels=("pos", "neg", "meh"))
    code, _, err = run_cli(capsys, "finetune", "finetune.method=classify", f"finetune.init_from={bert_run}",
                           f"finetune.train_path={train}", f"finetune.eval_path={bad}", f"train.run_dir={never}",
                           "train.steps=2", "data.seq_len=16", "train.progress=false")
    assert code == 2 and "label 'meh' is not in the label set ['neg', 'pos']" in err, err
    code, _, err = run_cli(capsys, "finetune", "finetune.method=classify", f"finetune.init_from={translator}",
                           f"finetune.train_path={train}", f"train.run_dir={never}")
    assert code == 2 and "needs an encoder checkpoint" in err, err
    code, _, err = run_cli(capsys, "pretrain", "bert-tiny", *BERT, "data.source=files", f"data.path={corpus}",
                           f"data.data_dir={tmp_path / 'tfds'}", f"tokenizer.path={translator / 'tokenizer.model'}",
                           f"train.run_dir={never}")
    assert code == 2 and "the tokenizer has no <mask> piece for masked-language modelling" in err, err
    code, _, err = run_cli(capsys, "generate", "--checkpoint", str(bert_run.parent / "nothing"), "--prompt", "x")
    assert code == 2 and "does not exist" in err
    code, _, err = run_cli(capsys, "pretrain", "bert-tiny", "data.source=toy", f"train.run_dir={never}")
    assert code == 2 and "data.source=toy cannot train model.kind=encoder: use data.source=stdlib|" in err, err
    assert not never.exists()


# ----------------------------------------------------------------------------- TFDS catalog datasets, end to end

import tensorflow_datasets as tfds  # noqa: E402
from etils import epath  # noqa: E402


class QkvTinyWmt(tfds.core.GeneratorBasedBuilder):
    """A stand-in for wmt14_translate/de-en: a Translation feature {"de", "en"}, one pair with an empty side."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="de-en")]
    code_path = epath.Path(__file__)

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.Translation(languages=["de", "en"]))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(range(40)), "validation": self._generate_examples(range(40, 48))}

    def _generate_examples(self, numbers):
        from qkv.data import number_to_words
        for n in numbers:
            yield n, {"de": str(n) if n != 7 else "", "en": number_to_words(n)}


class QkvTinySst2(tfds.core.GeneratorBasedBuilder):
    """A stand-in for glue/sst2: "sentence" and a ClassLabel "label", train and validation splits."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = epath.Path(__file__)

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "sentence": tfds.features.Text(), "label": tfds.features.ClassLabel(names=["negative", "positive"])}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(64, 0), "validation": self._generate_examples(16, 1)}

    def _generate_examples(self, n, seed):
        rng = np.random.default_rng(seed)
        for i in range(n):
            label = int(rng.integers(2))
            yield i, {"sentence": f"the film was {'great' if label else 'awful'} {i}", "label": label}


def test_tfds_translation_and_classification_datasets_train_through_the_cli(bert_run, tmp_path, capsys):
    data_dir = tmp_path / "tfds"
    QkvTinyWmt(data_dir=data_dir, config="de-en").download_and_prepare(file_format="array_record")
    QkvTinySst2(data_dir=data_dir).download_and_prepare(file_format="array_record")
    run_dir = tmp_path / "wmt"
    code, out, err = run_cli(capsys, "pretrain", "translate-tiny", *TRANSLATE, "data.source=tfds",
                             "data.tfds_name=qkv_tiny_wmt/de-en", f"data.data_dir={data_dir}", "data.source_field=de",
                             "data.target_field=en", f"train.run_dir={run_dir}", "train.steps=3",
                             "tokenizer.train_documents=80")
    assert code == 0, err
    assert "left out 0 pairs longer than data.source_seq_len/seq_len and 1 with an empty side" in out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["step"] == 3 and summary["pairs"] == 8 and 0 <= summary["bleu"] <= 100
    code, out, err = run_cli(capsys, "finetune", "finetune.method=classify", f"finetune.init_from={bert_run}",
                             "data.source=tfds", "data.tfds_name=qkv_tiny_sst2", f"data.data_dir={data_dir}",
                             "data.text_field=sentence", f"train.run_dir={tmp_path / 'sst2'}", "train.steps=3",
                             "data.seq_len=16", "train.batch_size=8", "train.progress=false")
    assert code == 0, err
    code, out, err = run_cli(capsys, "evaluate", "--checkpoint", str(tmp_path / "sst2"))
    result = json.loads(out)
    assert result["labels"] == ["negative", "positive"] and result["tokens"] == 16
