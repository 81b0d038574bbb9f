"""qkv: pretrain, fine-tune, decode and benchmark Transformer language models with JAX and Flax NNX.

Public API: ``qkv.load(run_dir)`` returns a ``LanguageModel`` with ``.logits``, ``.generate`` and
``.stream`` (decoders; ``.generate`` translates with encoder-decoders), ``.embed``, ``.neighbours``
and ``.classify`` (encoders); ``qkv.load_config`` and ``qkv.pretrain`` run training from Python.
"""
from __future__ import annotations

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so `qkv --help` and config errors answer without importing JAX.
    if name in ("load", "LanguageModel"):
        from . import api
        return getattr(api, name)
    if name == "load_config":
        from qkv.train.config import load_config
        return load_config
    if name == "evaluate":
        from qkv.inference.evaluate import evaluate
        return evaluate
    raise AttributeError(f"module 'qkv' has no attribute {name!r}")


def pretrain(cfg, report=None):
    """Train (or resume) ``cfg``'s run with its end-of-run report (a sample, BLEU); see qkv.train.loop.pretrain."""
    from qkv.inference.report import pretrain_report
    from qkv.train.loop import pretrain
    return pretrain(cfg, report=report if report is not None else pretrain_report(cfg))


__all__ = ["LanguageModel", "evaluate", "load", "load_config", "pretrain"]
