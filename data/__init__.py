"""qkv.data: tokenizer, text sources (TFDS/array_record, no TensorFlow) and Grain LM pipelines.

Depends on neither qkv.model nor qkv.train.
"""

from .corpus import stdlib_files
from .pipeline import (
    BATCH_KEYS,
    iterator_state_from_json,
    iterator_state_to_json,
    make_eval_dataset,
    make_lm_dataset,
)
from .sources import TextSource, open_text_source, record_text
from .tokenizer import Tokenizer, train_tokenizer

__all__ = [
    "BATCH_KEYS",
    "TextSource",
    "Tokenizer",
    "iterator_state_from_json",
    "iterator_state_to_json",
    "make_eval_dataset",
    "make_lm_dataset",
    "open_text_source",
    "record_text",
    "stdlib_files",
    "train_tokenizer",
]
