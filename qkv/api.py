"""The public Python API: load a trained run, get logits, generate text, translate, embed, classify.

    import qkv
    lm = qkv.load("runs/tiny")
    print(lm.generate("def fib(n):", max_new_tokens=40, temperature=0.0)[0])
    logits = lm.logits([lm.tokenizer.encode("import os")])   # [1, T, vocab] float32

    qkv.load("runs/translate-tiny").generate(["4721"], temperature=0.0)   # encoder-decoder: translations
    qkv.load("runs/translate-tiny").generate(["4721"], beam_size=4)        # beam search (either shape)
    enc = qkv.load("runs/bert-tiny")
    enc.embed(["import os", "import sys"])        # [2, d_model] sentence embeddings (mean of token vectors)
    enc.neighbours(["import os", "import sys", "x = 1"], k=1)   # cosine-similarity neighbours
    qkv.load("runs/classifier").classify(["great film"])         # label names of a fine-tuned classifier
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from flax import nnx

from qkv.data import Tokenizer
from qkv.data.chat_template import ChatTemplate, encode_rendered, stop_ids, template_for
from qkv.inference.decode import Decoder, SamplingConfig, check_beam
from qkv.inference.embeddings import nearest_pieces, special_ids, unit_rows
from qkv.model.encoder import mean_pool
from qkv.inference.run import load_run
from qkv.train.config import Config
from qkv.errors import UserError


@dataclass
class LanguageModel:
    config: Config
    tokenizer: Tokenizer | None  # None for converted checkpoints that came without a SentencePiece model
    graphdef: nnx.GraphDef
    params: Any
    step: int
    meta: dict[str, Any] = field(default_factory=dict)  # the checkpoint's metadata (chat template, eos ids)

    @classmethod
    def load(cls, run_dir: str | Path, step: int | None = None) -> "LanguageModel":
        """Parameters (no optimizer state), config and tokenizer of a checkpoint in ``run_dir``."""
        run = load_run(run_dir, step)
        return cls(run.config, run.tokenizer, run.graphdef, run.params, run.step, run.meta)

    def logits(self, token_ids: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
        """Float32 logits [B, T, vocab] for equal-length rows of token ids: next-token (decoder) or masked-token
        (encoder) predictions."""
        self._require("decoder", "encoder", what="logits of token ids")
        ids = np.asarray(token_ids, dtype=np.int32)
        if ids.ndim != 2:
            raise UserError(f"token_ids must be a [batch, length] array, got shape {ids.shape}")
        if ids.shape[1] > self.config.model.max_seq_len:
            raise UserError(f"{ids.shape[1]} tokens exceed the model's context of {self.config.model.max_seq_len}")
        return np.asarray(_forward(self.graphdef, self.params, ids))

    def _decoder(self, max_new_tokens: int, temperature: float, top_k: int, top_p: float, seed: int,
                 beam_size: int = 1, length_penalty: float = 0.6, text: bool = True) -> Decoder:
        """A decoder; for text (``text``) it only produces ids the tokenizer can decode, for ids in/ids out
        (``generate_ids``) every id of the model's vocabulary, as Hugging Face's generate does."""
        vocab_limit = self.tokenizer.vocab_size if text and self.tokenizer is not None else 0
        sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p,
                                  max_new_tokens=max_new_tokens, seed=seed, vocab_limit=vocab_limit)
        return Decoder(self.config.model, self.graphdef, sampling, beam_size, length_penalty)

    def prompt_ids(self, prompts: Sequence[str]) -> list[list[int]]:
        """BOS + token ids per prompt; refuses empty prompts and checkpoints without a tokenizer."""
        if self.tokenizer is None:
            raise UserError("this checkpoint has no tokenizer: convert it again with --tokenizer PATH "
                            "(tokenizer.json or .model), or generate from token ids (--prompt-ids)")
        if any(not p for p in prompts):
            raise UserError("empty prompt: give at least one character of text")
        return [[self.tokenizer.bos_id] + self.tokenizer.encode(p) for p in prompts]

    def fit_new_tokens(self, prompts: Sequence[str], max_new_tokens: int) -> tuple[int, str | None]:
        """(new tokens that fit, a notice when fewer than ``max_new_tokens``): after the longest prompt only
        ``max_seq_len - prompt tokens`` fit (an encoder-decoder's target side: the whole context). Asking for
        more is not an error: generation stops at the context, and the notice says so."""
        context = self.config.model.max_seq_len
        room = context if self.kind == "encoder_decoder" else context - max(len(p) for p in self.prompt_ids(prompts))
        if max_new_tokens <= room or room < 1:  # room < 1: the decoder refuses the prompt itself
            return max_new_tokens, None
        return room, (f"max_new_tokens={max_new_tokens} is more than the {room} tokens left in the model's context of "
                      f"{context} after the longest prompt: generating at most {room}")

    def _fitted(self, prompts: Sequence[str], max_new_tokens: int) -> int:
        fitted, notice = self.fit_new_tokens(prompts, max_new_tokens)
        if notice:
            warnings.warn(notice, stacklevel=3)
        return fitted

    @property
    def kind(self) -> str:
        return self.config.model.kind

    def _require(self, *kinds: str, what: str) -> None:
        if self.kind not in kinds:
            hint = {"encoder": "an encoder-only checkpoint reads text but does not generate it: use embed, "
                               "neighbours, classify or qkv evaluate",
                    "decoder": "use generate for text continuation"}.get(self.kind, "")
            raise UserError(f"{what} needs a model.kind={' or '.join(kinds)} checkpoint, not {self.kind}"
                            + (f": {hint}" if hint else ""))

    def generate(self, prompts: str | Sequence[str], max_new_tokens: int = 64, temperature: float = 0.8,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, beam_size: int = 1,
                 length_penalty: float = 0.6) -> list[str]:
        """Completions (without the prompt) for one or several prompts, decoded in one batch; for an
        encoder-decoder, the translations of the prompts. ``beam_size`` > 1: beam search (GNMT
        ``length_penalty``) instead of sampling, for either shape."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        self._require("decoder", "encoder_decoder", what="generation")
        SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
        check_beam(beam_size, length_penalty)
        max_new_tokens = self._fitted(prompts, max_new_tokens)
        if self.kind == "encoder_decoder":
            from qkv.inference.translate import translate
            self.prompt_ids(prompts)  # the same checks: a tokenizer, no empty prompt
            return translate(self.config.model, self.graphdef, self.params, self.tokenizer, prompts,
                             max_new_tokens=max_new_tokens, beam_size=beam_size, length_penalty=length_penalty,
                             temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                             batch_size=len(prompts))
        decoder = self._decoder(max_new_tokens, temperature, top_k, top_p, seed, beam_size, length_penalty)
        rows = decoder.generate(self.params, self.prompt_ids(prompts), self.tokenizer.pad_id, self.stop_ids)
        return [self.tokenizer.decode(r) for r in rows]

    def generate_ids(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int = 64, temperature: float = 0.8,
                     top_k: int = 0, top_p: float = 1.0, seed: int = 0, beam_size: int = 1,
                     length_penalty: float = 0.6) -> list[list[int]]:
        """New token ids (up to the tokenizer's eos, which is left out) after each row of prompt ids, taken as
        given (no bos added). Works without a tokenizer (then it never stops early; pad id 0)."""
        self._require("decoder", what="generation from token ids")
        rows = [[int(i) for i in row] for row in prompt_ids]
        vocab = self.config.model.vocab_size
        for row in rows:
            if not row:
                raise UserError("empty prompt: give at least one token id")
            if min(row) < 0 or max(row) >= vocab:
                raise UserError(f"prompt token id {min(row) if min(row) < 0 else max(row)} is outside the model's "
                                f"vocabulary of {vocab} ids (0..{vocab - 1})")
        pad, eos = (self.tokenizer.pad_id, self.stop_ids) if self.tokenizer else (0, self.stop_ids)
        decoder = self._decoder(max_new_tokens, temperature, top_k, top_p, seed, beam_size, length_penalty, text=False)
        return [[int(t) for t in r] for r in decoder.generate(self.params, rows, pad, eos)]

    def stream(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.8, top_k: int = 0,
               top_p: float = 1.0, seed: int = 0) -> Iterator[str]:
        """Yields the completion of one prompt piece by piece, as the tokens are produced (an
        encoder-decoder's translation comes whole: it is decoded in one compiled loop)."""
        if self.kind != "decoder":
            yield from self.generate([prompt], max_new_tokens, temperature, top_k, top_p, seed)
            return
        SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
        yield from self._stream_text(self.prompt_ids([prompt])[0], [self.tokenizer.eos_id],
                                     self._fitted([prompt], max_new_tokens), temperature, top_k, top_p, seed)

    def _stream_text(self, prompt_ids: list[int], stops: Sequence[int], max_new_tokens: int, temperature: float,
                     top_k: int, top_p: float, seed: int) -> Iterator[str]:
        decoder = self._decoder(max_new_tokens, temperature, top_k, top_p, seed)
        ids: list[int] = []
        shown = ""
        for tokens in decoder.stream(self.params, [prompt_ids], self.tokenizer.pad_id, list(stops)):
            token = int(tokens[0])
            if token in stops or token == self.tokenizer.pad_id:
                break
            ids.append(token)
            text = self.tokenizer.decode(ids)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 byte sequence: wait for the rest
                continue
            yield text[len(shown):]
            shown = text
        rest = self.tokenizer.decode(ids)[len(shown):]  # bytes that never completed a character: as generate shows them
        if rest:
            yield rest

    # -- chat (docs/chat.md): the model's own template, stopping at every end-of-turn id ---------------

    @functools.cached_property
    def chat_template(self) -> ChatTemplate:
        """The checkpoint's chat template (read at import or set by tokenizer.chat_template), else qkv's plain one,
        with the keyword arguments it was fine-tuned with (tokenizer.chat_template_kwargs)."""
        self._require("decoder", what="chat")
        if self.tokenizer is None:
            raise UserError("this checkpoint has no tokenizer: convert it again with --tokenizer PATH")
        return template_for(self.meta, self.tokenizer, kwargs=self.config.tokenizer.chat_template_kwargs)

    @functools.cached_property
    def stop_ids(self) -> list[int]:
        """eos, the template's end-of-turn token and the eos ids of the imported generation_config.json (those
        alone for a checkpoint without a tokenizer, which generates ids)."""
        if self.tokenizer is None or self.config.model.kind != "decoder":
            eos = [self.tokenizer.eos_id] if self.tokenizer is not None and self.tokenizer.eos_id is not None else []
            return sorted(set(eos) | {int(i) for i in self.meta.get("eos_ids", ())})
        return stop_ids(self.chat_template, self.tokenizer, self.meta.get("eos_ids", ()))

    def chat_prompt_ids(self, messages: Sequence[dict[str, Any]], check: bool = True,
                        **template_kwargs: Any) -> list[int]:
        """Ids of the conversation so far with the template's generation prompt (what the model answers);
        ``check``: refuse one that leaves no room in the model's context."""
        text = self.chat_template.render(list(messages), add_generation_prompt=True, **template_kwargs)
        ids = encode_rendered(self.tokenizer, text)[0]
        if check and len(ids) >= self.config.model.max_seq_len:
            raise UserError(f"the conversation has {len(ids)} tokens, the model's context is "
                            f"{self.config.model.max_seq_len}: drop earlier turns")
        return ids

    def chat(self, conversations: Sequence[Sequence[dict[str, Any]]], max_new_tokens: int = 128,
             temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             **template_kwargs: Any) -> list[str]:
        """The assistant's next reply to each conversation, decoded in one batch."""
        rows = [self.chat_prompt_ids(c, **template_kwargs) for c in conversations]
        room = self.config.model.max_seq_len - max(len(r) for r in rows)
        decoder = self._decoder(min(max_new_tokens, room), temperature, top_k, top_p, seed)
        out = decoder.generate(self.params, rows, self.tokenizer.pad_id, self.stop_ids)
        return [self.tokenizer.decode(r) for r in out]

    def chat_stream(self, messages: Sequence[dict[str, Any]], max_new_tokens: int = 128, temperature: float = 0.8,
                    top_k: int = 0, top_p: float = 1.0, seed: int = 0, **template_kwargs: Any) -> Iterator[str]:
        """The assistant's next reply, piece by piece as it is produced."""
        ids = self.chat_prompt_ids(messages, **template_kwargs)
        room = self.config.model.max_seq_len - len(ids)
        yield from self._stream_text(ids, self.stop_ids, min(max_new_tokens, room), temperature, top_k, top_p, seed)

    def _encoded(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        if not texts or any(not t for t in texts):
            raise UserError("give at least one non-empty text")
        limit = self.config.model.max_seq_len
        ids = [([self.tokenizer.bos_id] + self.tokenizer.encode(t) + [self.tokenizer.eos_id])[:limit] for t in texts]
        from qkv.inference.decode import right_pad
        return right_pad(ids, self.tokenizer.pad_id)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """One vector per text [N, d_model]: the mean of the encoder's output vectors over its tokens
        ([bos] text [eos], cut to the context)."""
        self._require("encoder", "encoder_decoder", what="embed")
        tokens, segments = self._encoded(list(texts))
        return np.asarray(_embed(self.graphdef, self.params, tokens, segments))

    def neighbours(self, texts: Sequence[str], k: int = 3) -> list[list[tuple[str, float]]]:
        """For each text, the ``k`` other texts with the most similar embeddings (cosine), best first."""
        unit = unit_rows(self.embed(texts))
        cosine = unit @ unit.T
        np.fill_diagonal(cosine, -np.inf)
        order = np.argsort(-cosine, axis=-1)[:, :k]
        return [[(texts[j], float(cosine[i, j])) for j in row] for i, row in enumerate(order)]

    def word_neighbours(self, words: Sequence[str], k: int = 5) -> list[list[tuple[str, float]]]:
        """For each word, the ``k`` vocabulary pieces whose input embeddings are nearest (cosine), best first:
        the model's word-level "semantic map". A word that is several pieces is the mean of their vectors."""
        embed = np.asarray(self.params["embed"], np.float32)
        out = []
        for word in words:
            near = nearest_pieces(embed, self.tokenizer.encode(word) if word else [], special_ids(self.tokenizer), k)
            out.append([(self.tokenizer.id_to_piece(i).replace("\u2581", " "), c) for i, c in near])
        return out

    def explain(self, text: str, **settings) -> Any:
        """Everything ``qkv explain`` reports about ``text`` (inference/explain.py: source=, position=, k=,
        temperature=, top_k=, top_p=, new_tokens=): ``.numbers`` (JSON-able) and ``.weights``."""
        from qkv.inference.explain import explain
        return explain(self.config.model, self.graphdef, self.params, self.tokenizer, text, **settings)

    def attention(self, text: str, source: str | None = None, stack: str = "self") -> np.ndarray:
        """Attention weights [layers, heads, T, S] of ``text`` from the model's forward pass (rows sum to 1);
        an encoder-decoder also has stack="encoder" and "cross" (target × source)."""
        from qkv.inference.explain import read
        weights = read(self.config.model, self.graphdef, self.params, self.tokenizer, text, source)[2]
        if stack not in weights:
            raise UserError(f"stack={stack!r}: this model has {', '.join(weights)}")
        return weights[stack]

    def next_token_table(self, text: str, k: int = 10, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                         position: int | None = None, source: str | None = None) -> list[dict[str, Any]]:
        """The ``k`` likeliest next tokens after ``text`` (encoder: at the masked ``position``) with logits,
        probabilities at T=1 and ``temperature``, and whether the sampler's top-k/top-p filter keeps them."""
        from qkv.inference.explain import next_token_table, read
        inputs, logits, _, _ = read(self.config.model, self.graphdef, self.params, self.tokenizer, text, source,
                                    position)
        return next_token_table(logits[inputs.position], self.tokenizer, k, temperature, top_k, top_p)["rows"]

    def classify(self, texts: Sequence[str]) -> list[Any]:
        """The predicted label of each text (a classifier fine-tuned with finetune.method=classify)."""
        self._require("encoder", what="classify")
        if not self.config.model.n_classes:
            raise UserError("this encoder has no classification head: fine-tune one with finetune.method=classify")
        tokens, segments = self._encoded(list(texts))
        logits = np.asarray(_classify(self.graphdef, self.params, tokens, segments))
        labels = self.config.finetune.labels or list(range(self.config.model.n_classes))
        return [labels[i] for i in logits.argmax(-1)]


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef: nnx.GraphDef, params: Any, ids: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, params)(ids)[0]


@functools.partial(jax.jit, static_argnums=0)
def _embed(graphdef: nnx.GraphDef, params: Any, tokens: jax.Array, segments: jax.Array) -> jax.Array:
    return mean_pool(nnx.merge(graphdef, params).encode(tokens, None, segments), segments)


@functools.partial(jax.jit, static_argnums=0)
def _classify(graphdef: nnx.GraphDef, params: Any, tokens: jax.Array, segments: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, params).classify(tokens, None, segments)


def load(run_dir: str | Path, step: int | None = None) -> LanguageModel:
    return LanguageModel.load(run_dir, step)
