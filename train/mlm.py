"""Masked-language-model corruption (BERT), done on the device inside the compiled train step.

Of the real tokens of a batch (not padding, not bos/eos/pad/unk/<mask>), each is picked with
probability ``rate`` (15 %); a picked token is replaced by ``<mask>`` 80 % of the time, by a random
regular token 10 %, and kept 10 %. The targets are the original tokens and only picked positions
carry loss. The key comes from the step number, so a resumed run masks exactly as an uninterrupted one.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from qkv.data.tokenizer import MASK_ID

FIRST_REGULAR_ID = MASK_ID + 1  # after pad 0, unk 1, bos 2, eos 3 and <mask> 4 (data/tokenizer.py)


def mlm_corrupt(batch: dict[str, jax.Array], key: jax.Array, mask_id: int, vocab_size: int,
                rate: float = 0.15, mask_frac: float = 0.8, random_frac: float = 0.1) -> dict[str, jax.Array]:
    """The batch with corrupted ``inputs``, ``targets`` = the original tokens, ``loss_mask`` = picked."""
    tokens_bt = batch["inputs"]
    k_pick, k_how, k_random = jax.random.split(key, 3)
    eligible_bt = (batch["segment_ids"] > 0) & (tokens_bt >= FIRST_REGULAR_ID)
    picked_bt = eligible_bt & (jax.random.uniform(k_pick, tokens_bt.shape) < rate)
    how_bt = jax.random.uniform(k_how, tokens_bt.shape)
    random_bt = jax.random.randint(k_random, tokens_bt.shape, FIRST_REGULAR_ID, vocab_size, tokens_bt.dtype)
    inputs_bt = jnp.where(picked_bt & (how_bt < mask_frac), mask_id,
                          jnp.where(picked_bt & (how_bt < mask_frac + random_frac), random_bt, tokens_bt))
    return {**batch, "inputs": inputs_bt.astype(tokens_bt.dtype), "targets": tokens_bt,
            "loss_mask": picked_bt.astype(batch["loss_mask"].dtype)}
