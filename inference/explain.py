"""What a trained model does with one text, as numbers: tokens, attention weights, next-token odds,
embedding neighbours, and what the KV cache saves. ``qkv explain`` draws them (inference/explain_report.py).

The attention weights come from the model's own forward pass: ``model.set_attributes(sow_weights=True)``
makes every attention layer run the einsum reference path and sow its softmax weights as an
``nnx.Intermediate`` (model/attention.py); the stacked blocks return them per layer, [L, B, H, T, S].
The next-token table filters with the sampler's own ``filter_logits`` (inference/decode.py), and the
cache table counts FLOPs with the training code's ``flops_per_token`` (train/metrics.py).

Shapes: a decoder shows causal self-attention and the next token after ``position`` (default: the last);
an encoder shows bidirectional attention and its masked-token prediction at ``position`` (replaced by
``<mask>``; default: the last text token); an encoder-decoder shows encoder, decoder and cross-attention
for a (source, target) pair (without a target, its own greedy translation of the source).
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qkv.model.config import ModelConfig
from qkv.train.metrics import flops_per_token

from .decode import Decoder, SamplingConfig, Seq2SeqDecoder, filter_logits
from .embeddings import nearest_pieces, pca_2d, special_ids
from qkv.errors import UserError

# Where the sown weights live in each shape, and what the report calls them.
STACKS = {("blocks", "attn"): "self", ("encoder_blocks", "attn"): "encoder", ("blocks", "cross_attn"): "cross"}


@dataclass
class Inputs:
    """What the forward pass reads: ``tokens`` (decoder input, encoder input, or the encoder-decoder's
    target input) and, for an encoder-decoder, ``source``; ``position`` is the query the table is about."""

    tokens: list[int]
    position: int
    source: list[int] | None = None
    masked_id: int | None = None  # encoder: the token that <mask> replaced at ``position``


@dataclass
class Explanation:
    numbers: dict[str, Any]  # JSON-able: tokens, summaries, tables
    weights: dict[str, np.ndarray] = field(default_factory=dict)  # stack -> [L, H, T, S] float32


def piece_rows(tokenizer, ids) -> list[dict[str, Any]]:
    """One row per token: id, SentencePiece piece, and whether it is a byte-fallback piece (<0x..>)."""
    rows = []
    for i in ids:
        piece = tokenizer.id_to_piece(int(i))
        rows.append({"id": int(i), "piece": piece, "byte": piece.startswith("<0x") and piece.endswith(">")})
    return rows


def build_inputs(cfg: ModelConfig, tokenizer, prompt: str, source: str | None = None,
                 position: int | None = None, target_ids: list[int] | None = None) -> Inputs:
    """The token ids each shape reads (bos/eos as in training), checked against the context length."""
    if tokenizer is None:
        raise UserError("this checkpoint has no tokenizer: convert it again with --tokenizer PATH.model")
    if not prompt:
        raise UserError("empty prompt: give at least one character of text with --prompt")
    limit = cfg.max_seq_len
    src = None
    if cfg.kind == "encoder_decoder":
        src_text = prompt if source is None else source
        if not src_text:
            raise UserError("empty source: give the text to translate with --source")
        src = tokenizer.encode(src_text) + [tokenizer.eos_id]
        target = tokenizer.encode(prompt) if source is not None else list(target_ids or [])
        tokens = [tokenizer.bos_id] + target
        _check_length(len(src), limit, "source")
    elif cfg.kind == "encoder":
        if cfg.n_classes:
            raise UserError("this encoder is a classifier (model.n_classes > 0): explain reads decoders, "
                            "masked-language-model encoders and encoder-decoders")
        if tokenizer.mask_id is None:
            raise UserError("the tokenizer has no <mask> piece: explain shows an encoder's masked-token guess")
        tokens = [tokenizer.bos_id] + tokenizer.encode(prompt) + [tokenizer.eos_id]
    else:
        tokens = [tokenizer.bos_id] + tokenizer.encode(prompt)
    _check_length(len(tokens), limit, "prompt")
    first, last = (1, len(tokens) - 2) if cfg.kind == "encoder" else (0, len(tokens) - 1)
    position = last if position is None else position
    if not first <= position <= last:
        raise UserError(f"--position {position} is outside the tokens that can be explained ({first}..{last}; "
                        "position 0 is <s>)")
    masked = None
    if cfg.kind == "encoder":
        masked, tokens = tokens[position], tokens[:position] + [tokenizer.mask_id] + tokens[position + 1:]
    return Inputs(tokens, position, src, masked)


def _check_length(n: int, limit: int, what: str) -> None:
    if n > limit:
        raise UserError(f"the {what} is {n} tokens (with <s>/</s>), longer than the model's context of {limit}: "
                        "shorten it")


def make_batch(inputs: Inputs) -> dict[str, Any]:
    """A one-row batch for ``model.forward_batch`` (the train step's entry point into every shape)."""
    tokens = np.asarray([inputs.tokens], np.int32)
    batch = {"inputs": tokens, "positions": None, "segment_ids": np.ones_like(tokens)}
    if inputs.source is not None:
        src = np.asarray([inputs.source], np.int32)
        batch.update(src_inputs=src, src_positions=None, src_segment_ids=np.ones_like(src))
    return batch


@functools.partial(jax.jit, static_argnums=0)
def _forward_sown(graphdef: nnx.GraphDef, params: Any, batch: dict[str, Any]):
    model = nnx.merge(graphdef, params)
    model.set_attributes(sow_weights=True)
    with warnings.catch_warnings():  # flax 0.12 prefers nnx.capture, which cannot reach the blocks that
        # run_blocks merges inside lax.scan; sow + nnx.pop per layer (model/transformer.py) can
        warnings.filterwarnings("ignore", "Using 'Module.sow", DeprecationWarning)
        logits = model.forward_batch(batch)
    return logits, nnx.to_pure_dict(nnx.pop(model, nnx.Intermediate))


def forward_with_weights(graphdef: nnx.GraphDef, params: Any, batch: dict[str, Any]
                         ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(logits [B, T, V] of the ordinary forward pass, {stack: attention weights [L, B, H, T, S]}) where a
    stack is "self" (the decoder's or encoder's own), "encoder" or "cross" (encoder-decoders)."""
    logits, sown = _forward_sown(graphdef, params, batch)
    weights = {}
    for (outer, inner), name in STACKS.items():
        if outer in sown and inner in sown[outer]:
            weights[name] = np.asarray(sown[outer][inner]["weights"][0], np.float32)
    return np.asarray(logits), weights


def head_summary(weights_hts: np.ndarray, causal: bool) -> list[dict[str, Any]]:
    """Per head: mean entropy of its rows (bits) and the share of attention on the first token, the same
    token, the previous token, the two before it, tokens further back, the next token and those further
    ahead (bidirectional only), averaged over the queries from position 2 on (where those are all different);
    ``mostly`` names the largest share."""
    h, t, s = weights_hts.shape
    p = np.clip(weights_hts.astype(np.float64), 1e-30, 1.0)
    entropy = -(weights_hts * np.log2(p)).sum(-1).mean(-1)
    q, k = np.arange(t)[:, None], np.arange(s)[None, :]
    regions = {"first": k == 0, "same": (k == q) & (k > 0), "previous": (k == q - 1) & (k > 0),
               "2-3 back": (k > 0) & (k >= q - 3) & (k < q - 1), "far back": (k > 0) & (k < q - 3)}
    if not causal:
        regions.update({"next": k == q + 1, "further ahead": k > q + 1})
    rows = slice(2, None) if t > 2 else slice(0, None)
    out = []
    for head in range(h):
        shares = {name: float((weights_hts[head] * region)[rows].sum(-1).mean()) for name, region in regions.items()}
        out.append({"head": head, "entropy_bits": float(entropy[head]), "shares": shares,
                    "mostly": max(shares, key=shares.get)})
    return out


def cross_summary(weights_hts: np.ndarray) -> list[dict[str, Any]]:
    """Per cross-attention head: mean entropy (bits) and the mean weight of each row's strongest source token."""
    p = np.clip(weights_hts.astype(np.float64), 1e-30, 1.0)
    entropy = -(weights_hts * np.log2(p)).sum(-1).mean(-1)
    peak = weights_hts.max(-1).mean(-1)
    return [{"head": i, "entropy_bits": float(entropy[i]), "peak_weight": float(peak[i])} for i in range(len(peak))]


def next_token_table(logits_v: np.ndarray, tokenizer, k: int = 10, temperature: float = 1.0, top_k: int = 0,
                     top_p: float = 1.0) -> dict[str, Any]:
    """The ``k`` best tokens by logit with softmax probabilities at T=1 and at ``temperature``, whether the
    sampler's top-k/top-p filter keeps them, and the probability the sampler then draws them with."""
    SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)  # the sampler's own validation
    # a model vocabulary padded beyond the tokenizer's: the sampler never draws those ids (vocab_limit), nor does this
    logits = np.asarray(logits_v, np.float32)[:tokenizer.vocab_size]
    p1 = _softmax(logits)
    if temperature == 0.0:  # greedy: all mass on the best token
        kept = np.zeros(logits.shape, bool)
        kept[np.argmax(logits)] = True
        p_t = p_sampled = kept.astype(np.float64)
    else:
        scaled = logits / np.float32(temperature)
        p_t = _softmax(scaled)
        filtered = np.asarray(filter_logits(jnp.asarray(scaled)[None], top_k, top_p))[0]
        kept = filtered > np.finfo(np.float32).min
        p_sampled = np.where(kept, _softmax(np.where(kept, scaled, -np.inf)), 0.0)
    order = np.argsort(-logits, kind="stable")[:k]
    rows = [{"rank": r + 1, **piece_rows(tokenizer, [i])[0], "logit": float(logits[i]), "p_t1": float(p1[i]),
             "p_temperature": float(p_t[i]), "kept": bool(kept[i]), "p_sampled": float(p_sampled[i])}
            for r, i in enumerate(order)]
    return {"temperature": temperature, "top_k": top_k, "top_p": top_p, "kept": int(kept.sum()),
            "entropy_bits_t1": float(-(p1 * np.log2(np.clip(p1, 1e-30, 1))).sum()), "rows": rows}


def _softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    e = np.exp(x - np.max(x))
    return e / e.sum()


def kv_cache_table(cfg: ModelConfig, prompt_len: int, new_tokens: int, source_len: int | None = None
                   ) -> dict[str, Any]:
    """Forward FLOPs of one new token at a few lengths with the cache (the forward of ``n`` tokens minus
    that of ``n - 1``: only the new token's work) and without it (all ``n`` tokens again, an encoder-decoder's
    encoder too), from the training FLOP count (one third of it is the forward pass); and the cache's size in
    bytes (an encoder-decoder also keeps its source's cross-attention keys and values)."""
    def forward(n: int) -> float:  # forward FLOPs of a whole sequence of n (target) tokens
        return 0.0 if n == 0 else n * flops_per_token(cfg, n, source_len) / 3.0

    lengths = sorted({n for n in (1, prompt_len, prompt_len + new_tokens, cfg.max_seq_len) if 1 <= n <= cfg.max_seq_len})
    rows = [{"length": n, "flops_with_cache": forward(n) - forward(n - 1), "flops_without_cache": forward(n)}
            for n in lengths]
    itemsize = cfg.compute_dtype.itemsize
    per_token = 2 * cfg.n_layers * cfg.num_kv_heads * cfg.head_size * itemsize  # keys and values, every layer
    total_len = prompt_len + new_tokens
    out = {"rows": rows, "cache_bytes_per_token": per_token, "tokens": total_len,
           "cache_bytes_total": per_token * total_len, "dtype": str(cfg.compute_dtype)}
    if source_len is not None:
        out["cross_memory_bytes"] = 2 * cfg.n_layers * cfg.num_kv_heads * cfg.head_size * itemsize * source_len
    return out


def greedy_check(cfg: ModelConfig, graphdef: nnx.GraphDef, params: Any, tokenizer, inputs: Inputs,
                 new_tokens: int) -> dict[str, Any]:
    """Greedy continuation decoded twice: with the KV cache (the real decoders of inference/) and without
    it (the whole forward pass again for every new token, reading the last position's logits)."""
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=new_tokens, vocab_limit=tokenizer.vocab_size)
    if cfg.kind == "encoder_decoder":
        cached = Seq2SeqDecoder(cfg, graphdef, greedy).generate(
            params, [inputs.source], tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)[0]
        start = [tokenizer.bos_id]
    else:
        cached = Decoder(cfg, graphdef, greedy).generate(params, [inputs.tokens], tokenizer.pad_id, tokenizer.eos_id)[0]
        start = list(inputs.tokens)
    uncached = _greedy_uncached(graphdef, params, start, inputs.source, new_tokens, tokenizer.eos_id,
                                tokenizer.vocab_size)
    return {"new_tokens": new_tokens, "cached": cached, "uncached": uncached, "same": cached == uncached,
            "text": tokenizer.decode(cached)}


def _greedy_uncached(graphdef, params, start: list[int], source: list[int] | None, steps: int, eos_id: int,
                     vocab_limit: int) -> list[int]:
    """Each step runs the full forward pass over a fixed-length buffer (causal: later slots cannot
    change earlier logits), so one compiled shape serves every step; ids from ``vocab_limit`` on (a model
    vocabulary padded beyond the tokenizer's) are never chosen, as in the cached decoders."""
    buffer = np.zeros(len(start) + steps, np.int32)
    buffer[:len(start)] = start
    out: list[int] = []
    for i in range(steps):
        n = len(start) + i
        batch = make_batch(Inputs(buffer.tolist(), 0, source))
        token = int(np.argmax(np.asarray(_forward(graphdef, params, batch))[0, n - 1, :vocab_limit]))
        if token == eos_id:
            break
        out.append(token)
        if n < len(buffer):
            buffer[n] = token
    return out


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef: nnx.GraphDef, params: Any, batch: dict[str, Any]) -> jax.Array:
    return nnx.merge(graphdef, params).forward_batch(batch)


def embedding_numbers(embed_vd: np.ndarray, tokenizer, ids: list[int], k: int = 5, n_map: int = 200
                      ) -> dict[str, Any]:
    """Nearest vocabulary pieces (cosine) of each distinct regular piece in ``ids``, and a 2-D PCA map of
    the input embeddings of the ``n_map`` pieces with the lowest ids after the special and byte pieces
    (SentencePiece numbers pieces by score: for BPE, the earliest merges of the most frequent pairs). Rows of a
    model vocabulary padded beyond the tokenizer's are no pieces: they are left out."""
    embed_vd = np.asarray(embed_vd)[:tokenizer.vocab_size]
    skip = set(special_ids(tokenizer))
    regular = [i for i in range(tokenizer.vocab_size) if i not in skip and not piece_rows(tokenizer, [i])[0]["byte"]]
    neighbours = []
    for i in dict.fromkeys(i for i in ids if i not in skip):
        near = nearest_pieces(embed_vd, [i], sorted(skip), k)
        neighbours.append({"id": i, "piece": tokenizer.id_to_piece(i),
                           "neighbours": [{"id": j, "piece": tokenizer.id_to_piece(j), "cosine": c} for j, c in near]})
    chosen = regular[:n_map]
    coords, variance = pca_2d(np.asarray(embed_vd, np.float32)[chosen])
    return {"neighbours": neighbours, "map": {"ids": chosen, "pieces": [tokenizer.id_to_piece(i) for i in chosen],
                                              "xy": coords.tolist(), "variance": variance.tolist()}}


def read(cfg: ModelConfig, graphdef: nnx.GraphDef, params: Any, tokenizer, prompt: str, source: str | None = None,
         position: int | None = None) -> tuple[Inputs, np.ndarray, dict[str, np.ndarray], list[int] | None]:
    """One explained forward pass: (inputs, logits [T, V], {stack: weights [L, H, T, S]}, the greedy target
    ids an encoder-decoder translated ``prompt`` into when no ``source`` was given, else None)."""
    target_ids = None
    if cfg.kind == "encoder_decoder" and source is None:  # explain the model's own translation
        probe = build_inputs(cfg, tokenizer, prompt)
        budget = cfg.max_seq_len - 1  # the whole translation (one compiled scan)
        greedy = SamplingConfig(temperature=0.0, max_new_tokens=budget, vocab_limit=tokenizer.vocab_size)
        target_ids = Seq2SeqDecoder(cfg, graphdef, greedy).generate(
            params, [probe.source], tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)[0]
    inputs = build_inputs(cfg, tokenizer, prompt, source, position, target_ids)
    logits, weights = forward_with_weights(graphdef, params, make_batch(inputs))
    return inputs, logits[0], {name: w[:, 0] for name, w in weights.items()}, target_ids


def explain(cfg: ModelConfig, graphdef: nnx.GraphDef, params: Any, tokenizer, prompt: str, *,
            source: str | None = None, position: int | None = None, k: int = 10, temperature: float = 1.0,
            top_k: int = 0, top_p: float = 1.0, new_tokens: int = 16, neighbours: int = 5,
            map_pieces: int = 200) -> Explanation:
    """Everything ``qkv explain`` shows about ``prompt`` (and ``source``), computed from the model."""
    SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)  # refuse bad settings before the work
    inputs, logits, weights, target_ids = read(cfg, graphdef, params, tokenizer, prompt, source, position)
    causal = cfg.kind != "encoder"
    numbers: dict[str, Any] = {
        "kind": cfg.kind, "prompt": prompt, "source": source, "position": inputs.position,
        "tokens": piece_rows(tokenizer, inputs.tokens),
        "source_tokens": None if inputs.source is None else piece_rows(tokenizer, inputs.source),
        "target_text": None if target_ids is None else tokenizer.decode(target_ids),
        "heads": {name: [cross_summary(w[layer]) if name == "cross" else head_summary(w[layer], causal and name == "self")
                         for layer in range(w.shape[0])] for name, w in weights.items()},
    }
    table = next_token_table(logits[inputs.position], tokenizer, k, temperature, top_k, top_p)
    if inputs.masked_id is not None:
        table["masked"] = piece_rows(tokenizer, [inputs.masked_id])[0]
    numbers["next_token"] = table
    numbers["embeddings"] = embedding_numbers(np.asarray(params["embed"], np.float32), tokenizer,
                                              inputs.tokens + (inputs.source or []), neighbours, map_pieces)
    if cfg.kind != "encoder":
        room = cfg.max_seq_len - (1 if inputs.source is not None else len(inputs.tokens))
        m = max(0, min(new_tokens, room))
        source_len = None if inputs.source is None else len(inputs.source)
        numbers["kv_cache"] = kv_cache_table(cfg, len(inputs.tokens), m, source_len)
        numbers["greedy_check"] = greedy_check(cfg, graphdef, params, tokenizer, inputs, m) if m else None
    return Explanation(numbers, weights)
