"""qkv: pretrain, fine-tune, decode and benchmark Transformer language models with JAX and Flax NNX.

Public API: ``qkv.load(run_dir)`` returns a ``LanguageModel`` with ``.logits``, ``.generate`` and
``.stream`` (decoders; ``.generate`` translates with encoder-decoders), ``.embed``, ``.neighbours``
and ``.classify`` (encoders); ``qkv.load_config`` and ``qkv.pretrain`` run training from Python.
"""
from __future__ import annotations

from .platforms import restrict_platforms

restrict_platforms()  # before JAX starts: no TPU-probe noise on CPU machines with libtpu (qkv/platforms.py)

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so `qkv --help` and config errors answer without importing JAX.
    if name in ("load", "LanguageModel"):
        from . import api
        return getattr(api, name)
    if name == "load_config":
        from qkv.train.config import load_config
        return load_config
    if name in ("pretrain", "evaluate"):
        from qkv.train import loop
        return getattr(loop, name)
    raise AttributeError(f"module 'qkv' has no attribute {name!r}")


__all__ = ["LanguageModel", "evaluate", "load", "load_config", "pretrain"]
