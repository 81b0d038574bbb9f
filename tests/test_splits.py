"""Split names: the config names the training and evaluation splits (TFDS syntax, slices included); the default is
what the dataset has (validation, else test, else a held-out slice of train). Checked on local array_record
builders shaped like lm1b (train/test) and wmt (train/validation/test)."""
from __future__ import annotations

import json
import logging

import pytest

tfds = pytest.importorskip("tensorflow_datasets")
from etils import epath  # noqa: E402

from qkv.data import open_text_source, tfds_pairs  # noqa: E402
from qkv.data.sources import resolve_split  # noqa: E402


@pytest.mark.parametrize("available, train, evaluation", [
    (["train", "test"], "train", "test"),                      # lm1b
    (["train", "validation", "test"], "train", "validation"),  # wmt
    (["train"], "train[:99%]", "train[99%:]"),                 # train only: 1 % held out, not trained on
])
def test_default_splits(available, train, evaluation):
    assert resolve_split("train", available)[0] == train
    assert resolve_split("validation", available)[0] == evaluation


def test_named_splits_and_refusals():
    assert resolve_split("train", ["train", "test"], "train[:90%]", "train[90%:]") == ("train[:90%]", "data.train_split")
    assert resolve_split("validation", ["train", "test"], "train[:90%]", "train[90%:]")[0] == "train[90%:]"
    assert resolve_split("train", ["train", "validation"], "train+validation")[0] == "train+validation"
    assert resolve_split("test", ["train", "test"])[0] == "test"  # qkv evaluate --split test
    with pytest.raises(ValueError, match=r"data.train_split='trian'.*split 'trian' does not exist"):
        resolve_split("train", ["train", "test"], "trian")
    with pytest.raises(ValueError, match="set data.eval_split"):
        resolve_split("validation", ["train"], "train[:50%]")


class QkvLm1bLike(tfds.core.GeneratorBasedBuilder):
    """lm1b's shape: a "text" feature, splits train and test only."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = epath.Path(__file__)

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples("train", 40), "test": self._generate_examples("test", 6)}

    def _generate_examples(self, split, n):
        for i in range(n):
            yield i, {"text": f"{split} sentence number {i}: the quick brown fox jumps over the lazy dog {i * 7}."}


class QkvWmtLike(tfds.core.GeneratorBasedBuilder):
    """wmt14_translate/de-en's shape: a Translation feature, splits train, validation and test."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="de-en")]
    code_path = epath.Path(__file__)

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.Translation(languages=["de", "en"]))

    def _split_generators(self, dl_manager):
        return {name: self._generate_examples(name, n) for name, n in (("train", 8), ("validation", 3), ("test", 2))}

    def _generate_examples(self, split, n):
        for i in range(n):
            yield i, {"de": f"{split} Satz {i}", "en": f"{split} sentence {i}"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    dd = tmp_path_factory.mktemp("tfds")
    QkvLm1bLike(data_dir=dd).download_and_prepare(file_format="array_record")
    QkvWmtLike(data_dir=dd, config="de-en").download_and_prepare(file_format="array_record")
    return dd


def texts(source) -> list[str]:
    return list(source)


def test_lm1b_shape_evaluates_on_test_and_says_so(data_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="qkv.data"):
        evaluation = open_text_source("tfds", None, "validation", data_dir, tfds_name="qkv_lm1b_like")
    assert sorted(texts(evaluation)) == sorted(texts(open_text_source("tfds", None, "test", data_dir,
                                                                      tfds_name="qkv_lm1b_like")))
    assert len(evaluation) == 6 and "validation split = test" in caplog.text
    train = open_text_source("tfds", None, "train", data_dir, tfds_name="qkv_lm1b_like")
    assert len(train) == 40


def test_slices_hold_out_part_of_train(data_dir):
    kw = dict(tfds_name="qkv_lm1b_like", train_split="train[:75%]", eval_split="train[75%:]")
    train = texts(open_text_source("tfds", None, "train", data_dir, **kw))
    held_out = texts(open_text_source("tfds", None, "validation", data_dir, **kw))
    assert (len(train), len(held_out)) == (30, 10) and not set(train) & set(held_out)
    assert all(t.startswith("train") for t in train + held_out)


def test_wmt_shape_uses_validation_and_named_splits(data_dir):
    name = "qkv_wmt_like/de-en"
    assert sorted(tfds_pairs(name, "validation", data_dir, "de", "en"))[0] == ("validation Satz 0", "validation sentence 0")
    test = tfds_pairs(name, "validation", data_dir, "de", "en", eval_split="test")
    assert len(test) == 2 and all(de.startswith("test") for de, _ in test)
    assert len(tfds_pairs(name, "train", data_dir, "de", "en", train_split="train+validation")) == 11


def test_pretrain_on_an_lm1b_shaped_dataset(data_dir, tmp_path, capsys):
    """The README's `qkv pretrain data.source=tfds data.tfds_name=lm1b`, on a dataset of lm1b's shape."""
    from qkv.cli import main
    small = ["model.vocab_size=300", "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.d_ff=64",
             "model.max_seq_len=32", "data.seq_len=32", "train.batch_size=8", "data.eval_batches=1",
             "tokenizer.train_documents=40", "train.sample_tokens=4", "train.steps=2", "train.eval_every=2",
             "tokenizer.model_type=char"]
    code = main(["pretrain", "tiny", *small, "data.source=tfds", "data.tfds_name=qkv_lm1b_like",
                 f"data.data_dir={data_dir}", f"train.run_dir={tmp_path / 'run'}"])
    out = capsys.readouterr()
    assert code == 0, out.err[-2000:]
    assert json.loads(out.out.strip().splitlines()[-1])["val_loss"] > 0
