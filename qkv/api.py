"""The public Python API: load a trained run, get logits, generate text.

    import qkv
    lm = qkv.load("runs/tiny")
    print(lm.generate("def fib(n):", max_new_tokens=40, temperature=0.0)[0])
    logits = lm.logits([lm.tokenizer.encode("import os")])   # [1, T, vocab] float32
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from flax import nnx

from qkv.data import Tokenizer
from qkv.model.decode import Decoder, SamplingConfig
from qkv.train import checkpoint
from qkv.train.config import Config, MeshConfig, config_from_dict
from qkv.train.sharding import make_mesh, resolve_rules
from qkv.train.step import abstract_params


@dataclass
class LanguageModel:
    config: Config
    tokenizer: Tokenizer | None  # None for converted checkpoints that came without a SentencePiece model
    graphdef: nnx.GraphDef
    params: Any
    step: int

    @classmethod
    def load(cls, run_dir: str | Path, step: int | None = None) -> "LanguageModel":
        """Parameters (no optimizer state), config and tokenizer of a checkpoint in ``run_dir``."""
        if not Path(run_dir).expanduser().exists():
            raise FileNotFoundError(f"checkpoint directory {run_dir!r} does not exist: pass a run directory "
                                    "written by qkv pretrain")
        meta = checkpoint.read_meta(run_dir, step)
        cfg = config_from_dict(meta["config"])
        mesh = make_mesh(MeshConfig())  # all local devices on the data axis: parameters replicated
        graphdef, params, _ = abstract_params(cfg.model, mesh, resolve_rules(cfg.mesh.rules))
        if cfg.finetune.lora.rank > 0:  # a LoRA run: its base model (finetune.init_from) + adapters, merged
            from qkv.train.finetune import load_lora_params
            params = load_lora_params(run_dir, meta, params)
        else:
            params = checkpoint.restore(run_dir, {"params": params}, meta["step"], with_optimizer=False)[0]["params"]
        tok = Tokenizer.from_bytes(checkpoint.decode_tokenizer(meta["tokenizer"])) if "tokenizer" in meta else None
        return cls(cfg, tok, graphdef, params, int(meta["step"]))

    def logits(self, token_ids: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
        """Float32 next-token logits [B, T, vocab] for equal-length rows of token ids."""
        ids = np.asarray(token_ids, dtype=np.int32)
        if ids.ndim != 2:
            raise ValueError(f"token_ids must be a [batch, length] array, got shape {ids.shape}")
        if ids.shape[1] > self.config.model.max_seq_len:
            raise ValueError(f"{ids.shape[1]} tokens exceed the model's context of {self.config.model.max_seq_len}")
        return np.asarray(_forward(self.graphdef, self.params, ids))

    def _decoder(self, max_new_tokens: int, temperature: float, top_k: int, top_p: float, seed: int) -> Decoder:
        sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p,
                                  max_new_tokens=max_new_tokens, seed=seed)
        return Decoder(self.config.model, self.graphdef, sampling)

    def prompt_ids(self, prompts: Sequence[str]) -> list[list[int]]:
        """BOS + token ids per prompt; refuses empty prompts and checkpoints without a tokenizer."""
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer: convert it again with --tokenizer PATH.model")
        if any(not p for p in prompts):
            raise ValueError("empty prompt: give at least one character of text")
        return [[self.tokenizer.bos_id] + self.tokenizer.encode(p) for p in prompts]

    def generate(self, prompts: str | Sequence[str], max_new_tokens: int = 64, temperature: float = 0.8,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> list[str]:
        """Completions (without the prompt) for one or several prompts, decoded in one batch."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        decoder = self._decoder(max_new_tokens, temperature, top_k, top_p, seed)
        rows = decoder.generate(self.params, self.prompt_ids(prompts), self.tokenizer.pad_id, self.tokenizer.eos_id)
        return [self.tokenizer.decode(r) for r in rows]

    def stream(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.8, top_k: int = 0,
               top_p: float = 1.0, seed: int = 0) -> Iterator[str]:
        """Yields the completion of one prompt piece by piece, as the tokens are produced."""
        decoder = self._decoder(max_new_tokens, temperature, top_k, top_p, seed)
        ids: list[int] = []
        shown = ""
        for tokens in decoder.stream(self.params, self.prompt_ids([prompt]), self.tokenizer.pad_id,
                                     self.tokenizer.eos_id):
            token = int(tokens[0])
            if token in (self.tokenizer.eos_id, self.tokenizer.pad_id):
                break
            ids.append(token)
            text = self.tokenizer.decode(ids)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 byte sequence: wait for the rest
                continue
            yield text[len(shown):]
            shown = text


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef: nnx.GraphDef, params: Any, ids: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, params)(ids)[0]


def load(run_dir: str | Path, step: int | None = None) -> LanguageModel:
    return LanguageModel.load(run_dir, step)
