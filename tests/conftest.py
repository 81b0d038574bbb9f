"""Shared test setup: 8 virtual CPU devices (for mesh tests) before any JAX backend starts."""
from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
