"""Translate with an encoder-decoder checkpoint and score it: batched decoding plus corpus BLEU."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qkv.data import Tokenizer
from qkv.model import ModelConfig
from qkv.inference.decode import SamplingConfig
from qkv.inference.decode import Seq2SeqDecoder

from .bleu import corpus_bleu


def translate(cfg: ModelConfig, graphdef: Any, params: Any, tok: Tokenizer, sources: Sequence[str], *,
              max_new_tokens: int, beam_size: int = 1, length_penalty: float = 0.6, temperature: float = 0.0,
              top_k: int = 0, top_p: float = 1.0, seed: int = 0, batch_size: int = 64) -> list[str]:
    """Target text for each source: greedy (temperature 0), sampled, or beam search (beam_size > 1)."""
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens,
                              seed=seed)
    decoder = Seq2SeqDecoder(cfg, graphdef, sampling, beam_size=beam_size, length_penalty=length_penalty)
    out: list[str] = []
    for start in range(0, len(sources), batch_size):
        chunk = [tok.encode(s) + [tok.eos_id] for s in sources[start:start + batch_size]]
        # every batch padded to the full size: one compiled shape for the whole corpus
        rows = decoder.generate(params, chunk + [chunk[-1]] * (batch_size - len(chunk)), tok.bos_id, tok.eos_id,
                                tok.pad_id)
        out += [tok.decode(r) for r in rows[:len(chunk)]]
    return out


def translate_and_score(cfg: ModelConfig, graphdef: Any, params: Any, tok: Tokenizer, pairs: Sequence[Sequence[str]],
                        *, max_new_tokens: int, beam_size: int = 1, batch_size: int = 64) -> dict[str, Any]:
    """Corpus BLEU (sacreBLEU's defaults) of translations of ``pairs``' sources against their targets."""
    sources, references = [p[0] for p in pairs], [p[1] for p in pairs]
    hypotheses = translate(cfg, graphdef, params, tok, sources, max_new_tokens=max_new_tokens, beam_size=beam_size,
                           batch_size=min(batch_size, len(sources)))
    scored = corpus_bleu(hypotheses, references)
    exact = sum(h == r for h, r in zip(hypotheses, references)) / max(len(pairs), 1)
    return {"bleu": scored["score"], "pairs": len(pairs), "exact_match": exact,
            "bleu_detail": {k: scored[k] for k in ("precisions", "bp", "sys_len", "ref_len")},
            "samples": list(zip(sources, hypotheses, references))}
