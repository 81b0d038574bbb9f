"""End-of-run reports: what a finished training run prints and adds to its summary.

Training (qkv.train) does not decode; its caller passes one of these as ``pretrain(cfg, report=...)``
or ``finetune(cfg, report=...)`` (qkv/cli.py and ``qkv.pretrain`` do):

  pretrain_report   decoders: a sampled continuation of train.sample_prompt (temperature 0.7, top-k 40);
                    encoder-decoders: greedy translations of the first 200 validation pairs, corpus
                    BLEU and three samples; encoders (MLM): nothing
  finetune_report   decoders: a greedy continuation of train.sample_prompt (when set)

``train.sample_tokens=0`` turns every report off. ``split_scores`` is what ``qkv evaluate`` adds for a
whole split (BLEU of an encoder-decoder).
"""
from __future__ import annotations

from typing import Any

from qkv.data import Tokenizer
from qkv.model import ModelConfig
from qkv.train.config import Config
from qkv.train.distributed import log
from qkv.train.loop import Finished, Report

from .decode import Decoder, SamplingConfig
from .translate import translate_and_score


def sample_text(model_cfg: ModelConfig, graphdef: Any, params: Any, tok: Tokenizer, prompt: str, max_new_tokens: int,
                *, temperature: float = 0.7, top_k: int = 40, seed: int = 0) -> str:
    """``prompt`` and its continuation by a decoder (sampled; greedy with temperature 0)."""
    decoder = Decoder(model_cfg, graphdef, SamplingConfig(temperature=temperature, top_k=top_k,
                                                          max_new_tokens=max_new_tokens, seed=seed))
    ids = decoder.generate(params, [[tok.bos_id] + tok.encode(prompt)], tok.pad_id, tok.eos_id)[0]
    return prompt + tok.decode(ids)


def _lm_sample(run: Finished) -> dict[str, Any]:
    t = run.cfg.train
    sample = sample_text(run.cfg.model, run.trainer.graphdef, run.params, run.tok, t.sample_prompt, t.sample_tokens)
    log("sample:\n" + sample)
    return {"sample": sample}


def _translation_report(run: Finished, limit: int = 200) -> dict[str, Any]:
    source = run.validation
    pairs = [source[i] for i in range(min(limit, len(source)))]  # TFDS sources index, they do not slice
    result = translate_and_score(run.cfg.model, run.trainer.graphdef, run.params, run.tok, pairs,
                                 max_new_tokens=run.cfg.data.seq_len)
    samples = result.pop("samples")[:3]
    sample = "\n".join(f"{s} -> {h}" for s, h, _ in samples)
    log(f"validation BLEU {result['bleu']:.1f} on {result['pairs']} pairs (greedy)")
    log("sample:\n" + sample)
    return {**result, "sample": sample}


def _greedy_sample(run: Finished) -> dict[str, Any]:
    t = run.cfg.train
    sample = sample_text(run.cfg.model, run.trainer.graphdef, run.params, run.tok, t.sample_prompt, t.sample_tokens,
                         temperature=0.0, top_k=0)
    log("sample (greedy):\n" + sample)
    return {"sample": sample}


def pretrain_report(cfg: Config) -> Report | None:
    """The end-of-run report of a pretraining run of ``cfg`` (None: nothing to report)."""
    if cfg.train.sample_tokens <= 0:
        return None
    return {"decoder": _lm_sample, "encoder_decoder": _translation_report}.get(cfg.model.kind)


def finetune_report(cfg: Config) -> Report | None:
    """The end-of-run report of a fine-tuning run of ``cfg``: a greedy sample from a decoder."""
    if cfg.train.sample_tokens <= 0 or not cfg.train.sample_prompt or cfg.model.kind != "decoder":
        return None
    return _greedy_sample


def split_scores(cfg: Config, graphdef: Any, params: Any, tok: Tokenizer, source, beam_size: int = 1) -> dict[str, Any]:
    """What ``qkv evaluate`` adds to a split's loss and accuracy: for an encoder-decoder, corpus BLEU,
    exact-match rate and BLEU's parts of greedy (or beam) translations of the whole split."""
    if cfg.model.kind != "encoder_decoder":
        return {}
    scored = translate_and_score(cfg.model, graphdef, params, tok, list(source), max_new_tokens=cfg.data.seq_len,
                                 beam_size=beam_size)
    return {"bleu": scored["bleu"], "bleu_pairs": scored["pairs"], "exact_match": scored["exact_match"],
            "bleu_detail": scored["bleu_detail"]}
