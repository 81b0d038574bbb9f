"""The model's hyper-parameters: one frozen dataclass, validated on construction.

Errors name the config key (``model.<field>``) and what is allowed, because users reach this
through YAML files and ``key=value`` overrides.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import jax.numpy as jnp
from qkv.errors import UserError

Positions = Literal["learned", "sinusoidal", "rope"]
RopeScaling = Literal["none", "linear", "llama3"]
Norm = Literal["layernorm", "rmsnorm"]
NormPosition = Literal["pre", "post", "output"]
Activation = Literal["relu", "gelu", "swiglu", "geglu"]
QkNorm = Literal["none", "rms", "head", "projection"]
LAYER_TYPES = ("full", "sliding")
DType = Literal["float32", "bfloat16"]
Remat = Literal["none", "full", "dots"]
AttentionImpl = Literal["auto", "xla", "splash", "cudnn", "reference"]
Pooling = Literal["first", "mean"]
Router = Literal["softmax", "softmax_normalized", "sigmoid_normalized"]

_CHOICES: dict[str, tuple[str, ...]] = {
    "kind": ("decoder", "encoder", "encoder_decoder"),
    "positions": ("learned", "sinusoidal", "rope"),
    "rope_scaling": ("none", "linear", "llama3"),
    "norm": ("layernorm", "rmsnorm"),
    "norm_position": ("pre", "post", "output"),
    "activation": ("relu", "gelu", "swiglu", "geglu"),
    "qk_norm": ("none", "rms", "head", "projection"),
    "dtype": ("float32", "bfloat16"),
    "param_dtype": ("float32", "bfloat16"),
    "remat": ("none", "full", "dots"),
    "attention_impl": ("auto", "xla", "splash", "cudnn", "reference"),
    "pooling": ("first", "mean"),
    "router": ("softmax", "softmax_normalized", "sigmoid_normalized"),
}


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Transformer language model."""

    kind: str = "decoder"  # registry key: decoder (GPT/Llama), encoder (BERT), encoder_decoder (translation)
    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: same as n_heads (MHA); fewer: grouped-query attention
    head_dim: int | None = None  # None: d_model // n_heads
    d_ff: int = 1024
    max_seq_len: int = 256
    positions: Positions = "rope"
    rope_theta: float = 10_000.0
    # Long-context RoPE (Hugging Face rope_type): linear divides every frequency by rope_factor;
    # llama3 (Llama 3.1) divides only the low frequencies, blending the band between the wavelengths
    # rope_original_max_len / rope_low_freq_factor and rope_original_max_len / rope_high_freq_factor.
    rope_scaling: RopeScaling = "none"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    norm: Norm = "rmsnorm"
    norm_eps: float = 1e-5
    # pre: x + f(norm(x)); post: norm(x + f(x)) (the original Transformer); output: x + norm(f(x)) (OLMo 2)
    norm_position: NormPosition = "pre"
    # RMS-normalise queries and keys before RoPE: "rms" per head without a scale (modded-nanogpt; `true` means
    # this), "head" per head with a learned scale over head_dim (Qwen 3, Gemma 3), "projection" over the whole
    # query / key projection with a learned scale (OLMo 2); "none" (or `false`) off
    qk_norm: bool | QkNorm = "none"
    activation: Activation = "swiglu"  # geglu: gelu (tanh approximation) gate, Gemma
    use_bias: bool = False
    tie_embeddings: bool = True
    dropout: float = 0.0
    dtype: DType = "float32"  # compute dtype of activations and matmuls
    param_dtype: DType = "float32"  # storage dtype of parameters
    remat: Remat = "none"  # gradient checkpointing per block
    # lax.scan over stacked layers (fast compiles) or unrolled; None: the platform's choice, made by the trainer
    # (train/step.py: unrolled on CPU up to 8 layers, scanned elsewhere); the model alone scans
    scan_layers: bool | None = None
    attention_impl: AttentionImpl = "auto"  # auto: splash on TPU, cudnn on GPU, xla on CPU (model/attention.py)
    # > 0: logits = cap * tanh(logits / cap) (Gemma 2's final_logit_softcapping, modded-nanogpt's "logit softcap")
    logit_softcap: float = 0.0
    loss_chunk: int = -1  # positions per cross-entropy chunk (model/loss.py): -1 auto (chunk when T x vocab is large), 0 off
    init_std: float = 0.02
    n_encoder_layers: int | None = None  # encoder_decoder: depth of the encoder (None: n_layers)
    n_classes: int = 0  # encoder: > 0 adds a classification head over the pooled sequence
    pooling: Pooling = "first"  # encoder classification: first token ([bos], BERT's [CLS]) or mean of tokens
    # --- mixture of experts (model/moe.py, docs/moe.md): n_experts > 0 replaces every block's MLP by a routed MoE
    n_experts: int = 0  # routed experts per layer (0: the dense MLP)
    n_experts_per_token: int = 2  # k: experts each token is sent to
    n_shared_experts: int = 0  # experts every token passes through as well (one MLP of n_shared x moe_d_ff)
    moe_d_ff: int = 0  # hidden width of one expert (0: model.d_ff)
    # softmax: the top-k softmax probabilities weigh the experts (OLMoE); softmax_normalized: ... renormalised to
    # sum to one (Mixtral, Qwen 3 MoE); sigmoid_normalized: top-k sigmoid scores, renormalised (DeepSeek-V3 style)
    router: Router = "softmax_normalized"
    router_aux_loss_weight: float = 0.01  # load-balancing loss weight (Hugging Face's router_aux_loss_coef)
    router_z_loss_weight: float = 0.0  # weight of mean logsumexp(router logits)^2 (ST-MoE's router z-loss)
    expert_capacity_factor: float = 0.0  # 0: dropless; c > 0: an expert takes at most c * tokens * k / n_experts

    # --- Features of Hugging Face families (docs/families.md); each default changes nothing ---
    qkv_bias: bool = False  # biases on the q/k/v projections only, not the output one (Qwen 2 / 2.5)
    norm_scale_offset: bool = False  # RMSNorm multiplies by (1 + w), w stored from 0 (Gemma)
    sandwich_norm: bool = False  # pre-norm blocks also normalise each sub-layer's output (Gemma 2 / 3: 4 norms)
    embed_scale: bool = False  # token embeddings multiplied by sqrt(d_model) (Gemma)
    query_scale: float = 0.0  # > 0: scores = q·k * query_scale (Gemma: query_pre_attn_scalar ** -0.5); 0: 1/sqrt(head)
    attn_softcap: float = 0.0  # > 0: attention scores = cap * tanh(scores / cap) (Gemma 2: 50)
    sliding_window: int = 0  # > 0: "sliding" layers attend to the last sliding_window keys (their own included)
    # per layer "full" or "sliding"; empty: every layer sliding when sliding_window > 0 (Mistral), else full
    layer_types: tuple[str, ...] = ()
    rope_local_theta: float = 0.0  # > 0: the RoPE base of sliding layers (Gemma 3: 10k local, 1M global)

    def __post_init__(self) -> None:
        if isinstance(self.qk_norm, bool):  # the older boolean spelling: true is today's scale-free "rms"
            object.__setattr__(self, "qk_norm", "rms" if self.qk_norm else "none")
        if isinstance(self.layer_types, (list, tuple)):
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        for key, allowed in _CHOICES.items():
            value = getattr(self, key)
            if value not in allowed:
                raise UserError(f"model.{key}={value!r} is not allowed: choose one of {', '.join(allowed)}")
        for key in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            if getattr(self, key) < 1:
                raise UserError(f"model.{key}={getattr(self, key)} must be a positive integer")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise UserError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}: "
                "change one of them or set model.head_dim"
            )
        kv = self.num_kv_heads
        if kv < 1 or self.n_heads % kv:
            raise UserError(
                f"model.n_kv_heads={kv} must divide model.n_heads={self.n_heads} (grouped-query attention)"
            )
        if self.positions == "rope" and self.head_size % 2:
            raise UserError(f"rope needs an even head size, got {self.head_size}: change model.head_dim")
        if self.rope_factor <= 0 or self.rope_original_max_len < 1:
            raise UserError(f"model.rope_factor={self.rope_factor} and model.rope_original_max_len="
                            f"{self.rope_original_max_len} must be positive")
        if self.rope_scaling == "llama3" and not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
            raise UserError(f"model.rope_low_freq_factor={self.rope_low_freq_factor} must be positive and below "
                            f"model.rope_high_freq_factor={self.rope_high_freq_factor}")
        if self.n_encoder_layers is not None and self.n_encoder_layers < 1:
            raise UserError(f"model.n_encoder_layers={self.n_encoder_layers} must be a positive integer (or null)")
        if self.n_classes and (self.n_classes < 2 or self.kind != "encoder"):
            raise UserError(f"model.n_classes={self.n_classes}: a classification head needs model.kind=encoder "
                            "and n_classes >= 2 (0: none)")
        if self.logit_softcap < 0:
            raise UserError(f"model.logit_softcap={self.logit_softcap}: use 0 (off) or a positive cap such as 30")
        if self.loss_chunk < -1:
            raise UserError(f"model.loss_chunk={self.loss_chunk}: use -1 (auto), 0 (no chunking) or a chunk length")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model.dropout={self.dropout} must be in [0, 1)")
        self._check_family_features()
        self._check_moe()

    def _check_family_features(self) -> None:
        for key in ("query_scale", "attn_softcap", "rope_local_theta"):
            if getattr(self, key) < 0:
                raise UserError(f"model.{key}={getattr(self, key)}: use 0 (off) or a positive number")
        if self.sliding_window < 0:
            raise UserError(f"model.sliding_window={self.sliding_window}: use 0 (every layer global) or a window length")
        if not isinstance(self.layer_types, tuple) or any(t not in LAYER_TYPES for t in self.layer_types):
            raise UserError(f"model.layer_types={self.layer_types!r}: give one of {', '.join(LAYER_TYPES)} per layer "
                            "(or [] for the default)")
        if self.layer_types and len(self.layer_types) != self.n_layers:
            raise UserError(f"model.layer_types has {len(self.layer_types)} entries for model.n_layers={self.n_layers}: "
                            "give one per layer")
        if "sliding" in self.layer_types and not self.sliding_window:
            raise UserError("model.layer_types names sliding layers but model.sliding_window=0: set the window")
        if self.kind != "decoder":
            for key, off in (("sliding_window", 0), ("attn_softcap", 0.0), ("query_scale", 0.0), ("layer_types", ())):
                if getattr(self, key) != off:
                    raise UserError(f"model.{key}={getattr(self, key)!r} is implemented for model.kind=decoder only: "
                                    f"remove it for model.kind={self.kind}")
            if self.norm_position == "output":
                raise UserError(f"model.norm_position=output is implemented for model.kind=decoder only: use pre or "
                                f"post for model.kind={self.kind}")
        if self.norm_scale_offset and self.norm != "rmsnorm":
            raise UserError("model.norm_scale_offset is an RMSNorm option (Gemma): set model.norm=rmsnorm")
        if self.norm_position == "output" and self.sandwich_norm:
            raise UserError("model.sandwich_norm already normalises sub-layer outputs: with model.norm_position=output "
                            "use one of them")

    def layer_is_sliding(self) -> tuple[bool, ...]:
        """Per layer: does it attend over a sliding window (see ``sliding_window`` / ``layer_types``)?"""
        if self.layer_types:
            return tuple(t == "sliding" for t in self.layer_types)
        return (self.sliding_window > 0,) * self.n_layers

    def _check_moe(self) -> None:
        """The mixture-of-experts fields (each error names its key)."""
        if self.n_experts < 0:
            raise UserError(f"model.n_experts={self.n_experts} must be >= 0 (0: a dense MLP)")
        for key in ("n_shared_experts", "moe_d_ff"):
            if getattr(self, key) < 0:
                raise UserError(f"model.{key}={getattr(self, key)} must be >= 0")
        for key in ("router_aux_loss_weight", "router_z_loss_weight", "expert_capacity_factor"):
            value = getattr(self, key)
            if not value >= 0 or value == float("inf"):
                raise UserError(f"model.{key}={value} must be a finite number >= 0")
        if self.n_experts and not 1 <= self.n_experts_per_token <= self.n_experts:
            raise UserError(f"model.n_experts_per_token={self.n_experts_per_token} must be in [1, model.n_experts="
                            f"{self.n_experts}]")
        if self.n_experts == 0 and self.n_shared_experts:
            raise UserError(f"model.n_shared_experts={self.n_shared_experts} needs routed experts: set "
                            "model.n_experts > 0 (or n_shared_experts=0)")

    @property
    def num_kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def encoder_layers(self) -> int:
        return self.n_encoder_layers or self.n_layers

    @property
    def expert_d_ff(self) -> int:
        return self.moe_d_ff or self.d_ff

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)
