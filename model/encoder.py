"""The other two shapes, on the same blocks: encoder-only (BERT) and encoder-decoder (translation).

Encoder: bidirectional self-attention (a token sees every token of its segment, before and after),
then vocabulary logits for masked-language modelling, or — with ``n_classes`` — class logits over a
pooled vector (the first token, BERT's [CLS] position, or the mean of the tokens).

Encoder-decoder (the original Transformer): the encoder reads the source once; the decoder is the
decoder-only model's causal stack with a cross-attention sub-layer in every block, whose queries come
from the decoder and whose keys/values come from the encoder's output. Source and target share one
embedding (a joint vocabulary). For decoding, :meth:`EncoderDecoder.memory_kv` projects the encoder
output into every layer's keys/values once; each step then reuses them (inference/decode.py).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from qkv.errors import UserError

from .attention import Mask
from .config import ModelConfig
from .layers import Norm, param
from .transformer import Cache, EmbedAndHead, Transformer, default_slots, layer_keys, run_blocks, stacked_blocks


def bidirectional_stack(model: EmbedAndHead, blocks, n_layers: int, tokens_bt: jax.Array,
                        positions_bt: jax.Array | None, segment_ids_bt: jax.Array | None,
                        dropout_key: jax.Array | None) -> jax.Array:
    """Embed ``tokens_bt`` and run ``blocks`` with every token seeing its whole segment (no final norm):
    the encoder of both shapes."""
    _, positions_bt, segment_ids_bt = default_slots(tokens_bt, positions_bt, segment_ids_bt)
    embed_key, keys = layer_keys(model.cfg, dropout_key, n_layers)
    x_btd, rope = model.embed_tokens(tokens_bt, positions_bt, embed_key)
    mask_bts = Mask(None, segment_ids_bt, segment_ids_bt)  # attention_mask's parts
    return run_blocks(model.cfg, blocks, x_btd, mask_bts, rope, keys=keys)[0]


def mean_pool(hidden_btd: jax.Array, segment_ids_bt: jax.Array | None = None) -> jax.Array:
    """The mean over each row's non-padding positions (segment id > 0) [B, D], summed in float32."""
    real_bt1 = (jnp.ones(hidden_btd.shape[:2]) if segment_ids_bt is None else segment_ids_bt > 0)[..., None]
    total_bd = jnp.sum(hidden_btd.astype(jnp.float32) * real_bt1, axis=1)
    return (total_bd / jnp.maximum(jnp.sum(real_bt1, axis=1), 1.0)).astype(hidden_btd.dtype)


class Encoder(EmbedAndHead):
    """Encoder-only (BERT): bidirectional blocks; MLM logits over the vocabulary, or class logits."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.init_io(cfg, rngs)
        self.blocks = stacked_blocks(cfg, cfg.n_layers, rngs)
        if cfg.n_classes:
            self.cls_head = param(rngs, (cfg.d_model, cfg.n_classes), ("embed", "classes"), cfg.init_std,
                                  cfg.weight_dtype)
            self.cls_bias = param(rngs, (cfg.n_classes,), ("classes",), None, cfg.weight_dtype)

    def encode(self, tokens_bt: jax.Array, positions_bt: jax.Array | None = None,
               segment_ids_bt: jax.Array | None = None, dropout_key: jax.Array | None = None) -> jax.Array:
        """Final hidden states [B, T, D]: one contextual vector per token."""
        return self.final(bidirectional_stack(self, self.blocks, self.cfg.n_layers, tokens_bt, positions_bt,
                                              segment_ids_bt, dropout_key))

    def __call__(self, tokens_bt: jax.Array, positions_bt: jax.Array | None = None,
                 segment_ids_bt: jax.Array | None = None, cache: Cache | None = None,
                 dropout_key: jax.Array | None = None) -> tuple[jax.Array, None]:
        """Float32 vocabulary logits [B, T, vocab] at every position (the MLM head), and no cache."""
        if cache is not None:
            raise UserError("an encoder-only model does not generate text: use a decoder or encoder_decoder checkpoint")
        return self.vocab_logits(self.encode(tokens_bt, positions_bt, segment_ids_bt, dropout_key)), None

    def pool(self, hidden_btd: jax.Array, segment_ids_bt: jax.Array | None = None) -> jax.Array:
        """One vector per row [B, D]: the first token's, or the mean over non-padding tokens."""
        return hidden_btd[:, 0] if self.cfg.pooling == "first" else mean_pool(hidden_btd, segment_ids_bt)

    def classify(self, tokens_bt: jax.Array, positions_bt: jax.Array | None = None,
                 segment_ids_bt: jax.Array | None = None, dropout_key: jax.Array | None = None) -> jax.Array:
        """Float32 class logits [B, n_classes]."""
        if not self.cfg.n_classes:
            raise UserError("this encoder has no classification head: fine-tune one with model.n_classes=K")
        pooled_bd = self.pool(self.encode(tokens_bt, positions_bt, segment_ids_bt, dropout_key), segment_ids_bt)
        dtype = self.cfg.compute_dtype
        logits_bc = pooled_bd @ self.cls_head[...].astype(dtype) + self.cls_bias[...].astype(dtype)
        return logits_bc.astype(jnp.float32)

    def forward_batch(self, batch: dict[str, jax.Array], dropout_key: jax.Array | None = None) -> jax.Array:
        """MLM logits [B, T, vocab], or class logits [B, 1, n_classes] against targets [B, 1]."""
        args = (batch["inputs"], batch["positions"], batch["segment_ids"], dropout_key)
        if self.cfg.n_classes:
            return self.classify(*args)[:, None, :]
        return self(*args[:3], dropout_key=dropout_key)[0]

    def forward_hidden(self, batch: dict[str, jax.Array], dropout_key: jax.Array | None = None) -> jax.Array | None:
        """Final hidden states behind the MLM logits; None for a classifier (its logits are not a vocab projection)."""
        if self.cfg.n_classes:
            return None
        return self.encode(batch["inputs"], batch["positions"], batch["segment_ids"], dropout_key)


class EncoderDecoder(Transformer):
    """Encoder-decoder: a bidirectional encoder stack, and the decoder stack with cross-attention."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.init_io(cfg, rngs)  # one embedding for source and target (joint vocabulary), one output head
        self.encoder_blocks = stacked_blocks(cfg, cfg.encoder_layers, rngs)
        if cfg.norm_position == "pre":
            self.encoder_norm = Norm(cfg, rngs)
        self.blocks = stacked_blocks(cfg, cfg.n_layers, rngs, cross=True)

    def encode(self, src_bs: jax.Array, src_positions_bs: jax.Array | None = None,
               src_segments_bs: jax.Array | None = None, dropout_key: jax.Array | None = None) -> jax.Array:
        """The encoder output [B, S, D] ("memory"), computed once per source."""
        x_bsd = bidirectional_stack(self, self.encoder_blocks, self.cfg.encoder_layers, src_bs, src_positions_bs,
                                    src_segments_bs, dropout_key)
        return self.encoder_norm(x_bsd) if self.cfg.norm_position == "pre" else x_bsd

    def memory_kv(self, memory_bsd: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Every decoder layer's cross-attention keys and values [L, B, S, K, E], projected once."""
        graphdef, stacked = nnx.split(self.blocks)
        return jax.vmap(lambda p: nnx.merge(graphdef, p).cross_attn.memory_kv(memory_bsd))(stacked)

    def forward_batch(self, batch: dict[str, jax.Array], dropout_key: jax.Array | None = None) -> jax.Array:
        """Teacher-forced target logits [B, T, vocab]: decoder inputs are the targets shifted right."""
        enc_key, dec_key = jax.random.split(dropout_key) if dropout_key is not None else (None, None)
        memory_bsd = self.encode(batch["src_inputs"], batch["src_positions"], batch["src_segment_ids"], enc_key)
        return self(batch["inputs"], batch["positions"], batch["segment_ids"], dropout_key=dec_key,
                    memory=(memory_bsd, batch["src_segment_ids"]))[0]

    def forward_hidden(self, batch: dict[str, jax.Array], dropout_key: jax.Array | None = None) -> jax.Array:
        """The decoder's final hidden states behind ``forward_batch``'s logits."""
        enc_key, dec_key = jax.random.split(dropout_key) if dropout_key is not None else (None, None)
        memory_bsd = self.encode(batch["src_inputs"], batch["src_positions"], batch["src_segment_ids"], enc_key)
        return self(batch["inputs"], batch["positions"], batch["segment_ids"], dropout_key=dec_key,
                    memory=(memory_bsd, batch["src_segment_ids"]), hidden=True)[0]
