"""Embedding-space geometry shared by the API's word neighbours and ``qkv explain``: cosine similarity
between input embeddings, nearest vocabulary pieces, and a 2-D PCA map."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from qkv.errors import UserError


def unit_rows(x: np.ndarray) -> np.ndarray:
    """``x`` scaled to unit length along its last axis (zero vectors stay zero), for cosine similarity."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def special_ids(tokenizer) -> list[int]:
    """The tokenizer's pad, unk, bos, eos (and <mask>) ids: never anyone's neighbour."""
    t = tokenizer
    return [i for i in (t.pad_id, t.unk_id, t.bos_id, t.eos_id, t.mask_id) if i is not None]


def nearest_pieces(embed_vd: np.ndarray, ids: Sequence[int], exclude: Sequence[int], k: int) -> list[tuple[int, float]]:
    """The ``k`` vocabulary ids whose embeddings are nearest (cosine) to the mean of ``ids``' embeddings,
    best first, as (id, cosine); ``ids`` themselves and ``exclude`` are left out."""
    if not len(ids):
        raise UserError("give a non-empty word")
    unit = unit_rows(np.asarray(embed_vd, np.float32))
    cosine = unit @ unit_rows(unit[list(ids)].mean(0))
    cosine[list(ids)] = -np.inf  # not the word itself
    cosine[list(exclude)] = -np.inf
    return [(int(i), float(cosine[i])) for i in np.argsort(-cosine)[:k]]


def pca_2d(x_nd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(coordinates [N, 2] on the two principal axes of the centred rows, fraction of variance of each)."""
    x = np.asarray(x_nd, np.float64)
    x = x - x.mean(0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    variance = s ** 2 / max(float(np.sum(s ** 2)), 1e-300)
    return x @ vt[:2].T, variance[:2]
