"""qkv.data: tokenizer, text sources (TFDS/array_record, no TensorFlow) and Grain LM pipelines;
parallel text for encoder-decoder models (seq2seq) and labeled text for classifiers (classify).

Depends on neither qkv.model nor qkv.train.
"""

from .classify import (
    CLASSIFY_BATCH_KEYS,
    ClassExample,
    ClassifyIterator,
    ClassifySet,
    LabeledText,
    classify_eval_batches,
    classify_examples,
    infer_labels,
    read_labeled,
    tfds_labeled,
)
from .corpus import stdlib_files
from .mixture import MixtureIterator, RowStream, StreamSource, Texts, open_sources
from .streams import STREAM_KINDS, Shard, filesystem, list_shards, read_rows
from .pipeline import (
    BATCH_KEYS,
    iterator_state_from_json,
    iterator_state_to_json,
    make_eval_dataset,
    make_lm_dataset,
)
from .seq2seq import (
    SEQ2SEQ_BATCH_KEYS,
    Pair,
    PairTexts,
    Seq2SeqExample,
    Seq2SeqIterator,
    TfdsPairs,
    load_pairs,
    number_to_words,
    seq2seq_eval_batches,
    tfds_pairs,
    tokenize_pairs,
    toy_pairs,
    toy_split,
)
from .examples import DataError, Example, ExampleSet, OrderedIterator, PackingIterator, read_jsonl, rows_to_batch
from .sources import TextSource, open_catalog, open_text_source, record_text
from .tokenizer import Tokenizer, train_tokenizer

__all__ = [
    "MixtureIterator", "RowStream", "STREAM_KINDS", "Shard", "StreamSource", "Texts", "filesystem", "list_shards",
    "open_sources", "read_rows",
    "BATCH_KEYS",
    "CLASSIFY_BATCH_KEYS",
    "ClassExample",
    "ClassifyIterator",
    "ClassifySet",
    "DataError",
    "Example",
    "ExampleSet",
    "OrderedIterator",
    "PackingIterator",
    "LabeledText",
    "Pair",
    "PairTexts",
    "SEQ2SEQ_BATCH_KEYS",
    "Seq2SeqExample",
    "Seq2SeqIterator",
    "TextSource",
    "TfdsPairs",
    "Tokenizer",
    "classify_eval_batches",
    "classify_examples",
    "infer_labels",
    "iterator_state_from_json",
    "iterator_state_to_json",
    "load_pairs",
    "make_eval_dataset",
    "make_lm_dataset",
    "number_to_words",
    "open_catalog",
    "open_text_source",
    "read_jsonl",
    "read_labeled",
    "record_text",
    "rows_to_batch",
    "seq2seq_eval_batches",
    "stdlib_files",
    "tfds_labeled",
    "tfds_pairs",
    "tokenize_pairs",
    "toy_pairs",
    "toy_split",
    "train_tokenizer",
]
