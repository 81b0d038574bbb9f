"""A TFDS builder for local text corpora, written as array_record and read without TensorFlow.

Each distinct corpus (its files' paths, sizes and mtimes, plus the reading options) gets its own
builder config named by a fingerprint, so the build lands in
`data_dir/qkv_text/<kind>_<fingerprint>/1.0.0/` and a later call with an unchanged corpus reuses it.
TFDS writes a build into an `incomplete.*` directory and renames it into place only when it
finishes, so an interrupted build is never mistaken for a finished one.

The builder lives outside a TFDS package directory, where `dataset_info_from_configs` fails, so
`_info` constructs `tfds.core.DatasetInfo` directly.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import tensorflow_datasets as tfds
from etils import epath

from .corpus import CorpusSpec, document_keys, iter_documents, split_keys


class QkvText(tfds.core.GeneratorBasedBuilder):
    """Documents of a local corpus as {'text': Text}, split train/validation by document."""

    name = "qkv_text"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Local text/JSONL corpus, split by document key."}
    # TFDS derives code_path from the top-level package via importlib_resources, which is not
    # installed here (and qkv's package-dir mapping would confuse it): name the file directly.
    code_path = epath.Path(__file__)

    def __init__(self, *, spec: CorpusSpec, data_dir: str, **kwargs: Any):
        self._spec = spec
        self._splits: tuple[list[str], list[str]] | None = None
        config = tfds.core.BuilderConfig(
            name=spec.config_name(),
            description=f"{spec.kind} corpus at {spec.root} ({len(spec.files)} files)",
        )
        super().__init__(data_dir=data_dir, config=config, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Documents of a local text corpus (one file or JSONL record each).",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
        )

    def plan(self) -> None:
        """Lists documents and assigns splits; raises ValueError on a bad or empty corpus.

        Called before `download_and_prepare` so input errors surface as themselves, not from
        inside TFDS's generation machinery.
        """
        self._splits = split_keys(document_keys(self._spec), self._spec.validation_fraction)

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        if self._splits is None:
            self.plan()
        train, validation = self._splits
        return {
            "train": self._generate_examples(set(train)),
            "validation": self._generate_examples(set(validation)),
        }

    def _generate_examples(self, keys: set[str]) -> Iterator[tuple[str, dict[str, str]]]:
        for key, text in iter_documents(self._spec, keys):
            yield key, {"text": text}


@contextlib.contextmanager
def _quiet_tfds() -> Iterator[None]:
    """Hides TFDS progress bars and absl warnings (e.g. 'Using custom data configuration')."""
    from tensorflow_datasets.core.utils import tqdm_utils

    was_active = getattr(tqdm_utils, "_active", True)
    absl_logger = logging.getLogger("absl")
    old_level = absl_logger.level
    tfds.display_progress_bar(False)
    absl_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        tfds.display_progress_bar(was_active)
        absl_logger.setLevel(old_level)


def build_text_dataset(spec: CorpusSpec, data_dir: str) -> QkvText:
    """Builds (or reuses) the array_record dataset for `spec` under `data_dir`."""
    with _quiet_tfds():
        builder = QkvText(spec=spec, data_dir=data_dir)
        if builder.is_prepared():
            return builder
        builder.plan()
        try:
            builder.download_and_prepare(
                file_format="array_record",
                download_config=tfds.download.DownloadConfig(try_download_gcs=False),
            )
        except OSError:
            # Several processes (e.g. one per host on a shared disk) may build the same corpus at
            # once; each writes its own incomplete dir and only the first rename wins. A loser
            # finds the winner's finished build and uses it.
            winner = QkvText(spec=spec, data_dir=data_dir)
            if not winner.is_prepared():
                raise
            return winner
    return builder
