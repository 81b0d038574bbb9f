"""LoRA: low-rank adapters on chosen kernels of the stacked blocks (see train/finetune.py's docstring).

For each targeted kernel W of shape [layers, *in, *out] the adapters are A [layers, in, r] (normal,
std 1/sqrt(in)) and B [layers, r, out] (zeros); the model uses W + (alpha / r) · A @ B, merged
functionally before it runs (``merge_lora``).
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict
from qkv.errors import UserError

LORA_KERNELS = {("attn", "wq"), ("attn", "wk"), ("attn", "wv"), ("attn", "wo"), ("mlp", "wi"), ("mlp", "wg"),
                ("mlp", "wo")}
LORA_GROUPS = {"attention": ("attn",), "mlp": ("mlp",), "all": ("attn", "mlp")}


def lora_paths(base: Any, targets: list[str]) -> list[tuple[str, ...]]:
    """Parameter paths (e.g. ('blocks', 'attn', 'wq')) of the kernels named by ``targets``."""
    present = {p[-2:]: p for p in flatten_dict(base) if p[0] == "blocks" and p[-2:] in LORA_KERNELS}
    picked: list[tuple[str, ...]] = []
    for name in targets:
        if name in LORA_GROUPS:
            keys = [k for k in sorted(present) if k[0] in LORA_GROUPS[name]]
        elif "." in name:
            keys = [tuple(name.split(".", 1))]
        else:
            keys = [k for k in sorted(LORA_KERNELS) if k[1] == name]
            if len(keys) > 1:
                raise UserError(f"finetune.lora.targets: {name!r} is ambiguous: write "
                                f"{' or '.join('.'.join(k) for k in keys)}")
        choices = "wq, wk, wv, attn.wo, wi, wg, mlp.wo, attention, mlp, all"
        if not keys or any(k not in LORA_KERNELS for k in keys):
            raise UserError(f"finetune.lora.targets: unknown target {name!r}: choose from {choices}")
        for k in keys:
            if k not in present:
                raise UserError(f"finetune.lora.targets: this model has no {'.'.join(k)} kernel: choose from "
                                f"{', '.join('.'.join(p) for p in sorted(present))}")
            if present[k] not in picked:
                picked.append(present[k])
    return picked


def lora_shape(kernel_shape: tuple[int, ...], axes: tuple[str, ...]) -> tuple[int, int, int]:
    """(layers, in, out) of a stacked kernel: output projections end in ``embed``, others start with it."""
    n_in = len(kernel_shape) - 2 if axes[-1] == "embed" else 1
    layers, rest = kernel_shape[0], kernel_shape[1:]
    return layers, math.prod(rest[:n_in]), math.prod(rest[n_in:])


def init_lora(base_shapes: Any, axes: Any, targets: list[str], rank: int, seed: int) -> dict[str, Any]:
    """Adapters {path...: {"lora_a": [L, in, r] normal/sqrt(in), "lora_b": [L, r, out] zeros}}."""
    flat_shapes, flat_axes = flatten_dict(base_shapes), flatten_dict(axes, is_leaf=lambda _, x: isinstance(x, tuple))
    out = {}
    for i, path in enumerate(lora_paths(base_shapes, targets)):
        layers, n_in, n_out = lora_shape(tuple(flat_shapes[path].shape), flat_axes[path])
        key = jax.random.fold_in(jax.random.key(seed), i)
        out[path + ("lora_a",)] = jax.random.normal(key, (layers, n_in, rank), jnp.float32) / math.sqrt(n_in)
        out[path + ("lora_b",)] = jnp.zeros((layers, rank, n_out), jnp.float32)
    return unflatten_dict(out)


def merge_lora(base: Any, adapters: Any, scale: float) -> Any:
    """Base parameters with every adapted kernel W replaced by W + scale · A @ B (a new tree)."""
    flat = dict(flatten_dict(base))
    flat_ad = flatten_dict(adapters)
    for path in {p[:-1] for p in flat_ad}:
        w, a, b = flat[path], flat_ad[path + ("lora_a",)], flat_ad[path + ("lora_b",)]
        delta = jnp.einsum("lir,lro->lio", a, b, precision=jax.lax.Precision.HIGHEST).reshape(w.shape)
        flat[path] = (w + scale * delta).astype(w.dtype)
    return unflatten_dict(flat)
