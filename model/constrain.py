"""Activation layout hints: the model names an activation's axes, training decides what that means.

``constrain(x, ("batch", "length", "activation_embed"))`` is the identity unless a layout is active;
``train/step.py`` activates one (logical axes → a sharding on its mesh) while the train and eval
steps are traced, so XLA keeps the intended layout at block boundaries instead of guessing. Decoding
and plain calls run with no layout: the model itself holds no device logic.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator

import jax

Layout = Callable[[tuple[str | None, ...], tuple[int, ...]], Any]  # (logical axes, shape) -> sharding
_LAYOUT: contextvars.ContextVar[Layout | None] = contextvars.ContextVar(
    "qkv_activation_layout", default=None)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """``x`` with a sharding constraint from the active layout, or ``x`` unchanged when none is."""
    to_sharding = _LAYOUT.get()
    return x if to_sharding is None else jax.lax.with_sharding_constraint(x, to_sharding(axes, x.shape))


def layout_sharding(axes: tuple[str | None, ...], shape: tuple[int, ...]) -> Any | None:
    """The active layout's sharding for an array with these logical axes, or None outside a layout.

    Kernels XLA cannot partition (model/flash.py) read the mesh and specs from it for ``shard_map``.
    """
    to_sharding = _LAYOUT.get()
    return None if to_sharding is None else to_sharding(axes, shape)


@contextlib.contextmanager
def activation_layout(to_sharding: Layout) -> Iterator[None]:
    """Within the block, ``constrain`` maps logical axes to shardings with ``to_sharding``."""
    token = _LAYOUT.set(to_sharding)
    try:
        yield
    finally:
        _LAYOUT.reset(token)
