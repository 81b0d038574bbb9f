"""Flash-attention kernels (model/flash.py) in Pallas interpret mode equal ``reference_attention``:
forward and gradients, causal and bidirectional, packed segments, padding, grouped-query heads; also
per shard under the train step's layout (shard_map), and ``auto`` per platform."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from qkv.model import ModelConfig
from qkv.model.attention import Mask, dot_product_attention, reference_attention, select_impl
from qkv.train.config import MeshConfig
from qkv.train.sharding import LOGICAL_RULES, activation_layout, make_mesh

pytestmark = pytest.mark.slow  # trains, compiles or runs processes: deselect with -m 'not slow'

B, T, H, E = 2, 128, 4, 32


def inputs(kv_heads: int, causal: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    q, k, v, ct = (jnp.asarray(rng.normal(size=s), jnp.float32)
                   for s in [(B, T, H, E), (B, T, kv_heads, E), (B, T, kv_heads, E), (B, T, H, E)])
    seg = np.ones((B, T), np.int32)
    seg[0, 50:], seg[0, 100:] = 2, 3  # three packed documents
    seg[1, 90:] = 0  # padding
    seg = jnp.asarray(seg)
    return q, k, v, ct, Mask(jnp.broadcast_to(jnp.arange(T), (B, T)) if causal else None, seg, seg)


def max_errors(impl: str, q, k, v, ct, mask, wrap=lambda f: f):
    def loss(attend):
        return lambda q, k, v: jnp.sum(attend(q, k, v) * ct)
    kernel = wrap(lambda q, k, v: dot_product_attention(q, k, v, mask, impl))
    reference = lambda q, k, v: reference_attention(q, k, v, mask.dense())  # noqa: E731
    out, ref = jax.jit(kernel)(q, k, v), reference(q, k, v)
    grads = jax.jit(jax.grad(loss(kernel), argnums=(0, 1, 2)))(q, k, v)
    ref_grads = jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v)
    return [float(jnp.max(jnp.abs(a - b))) for a, b in zip((out, *grads), (ref, *ref_grads))]


@pytest.mark.parametrize("impl, kv_heads, causal", [
    ("splash", 2, True), ("splash", 4, False), ("cudnn", 2, True), ("cudnn", 1, False)])
def test_kernel_equals_reference_forward_and_gradients(impl, kv_heads, causal):
    errors = max_errors(impl, *inputs(kv_heads, causal))
    assert max(errors) < 2e-5, errors  # float32 values of order 1


def test_splash_runs_per_shard_under_the_train_layout():
    """Batch over (data, fsdp), heads over tensor, inside shard_map: the same numbers as the reference.
    kv heads 1 cannot split over tensor=2: they are repeated per query head for the kernel."""
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=2), jax.devices()[:4])
    for kv_heads in (2, 1):
        q, k, v, ct, mask = inputs(kv_heads, causal=True, seed=kv_heads)
        spec = PartitionSpec(("data", "fsdp"), None, "tensor", None)
        q = jax.device_put(q, NamedSharding(mesh, spec))

        def under_layout(f):
            def g(*args):
                with activation_layout(mesh, LOGICAL_RULES):
                    return f(*args)
            return g

        lowered = jax.jit(under_layout(lambda q, k, v: dot_product_attention(q, k, v, mask, "splash"))).lower(q, k, v)
        assert "shard_map" in lowered.as_text() or "sdy.manual_computation" in lowered.as_text()
        errors = max_errors("splash", q, k, v, ct, mask, wrap=under_layout)
        assert max(errors) < 2e-5, (kv_heads, errors)


def test_auto_picks_the_kernel_of_the_platform():
    assert jax.default_backend() == "cpu"
    assert select_impl("auto", 128, 128, 64) == "xla"  # CPU: XLA
    from qkv.tools.topology_plan import topology_devices
    tpu = topology_devices("v5p:2x2x1")  # the TPU compiler's devices (libtpu from the test extra), no TPU
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=1), tpu)
    with activation_layout(mesh, LOGICAL_RULES):
        assert select_impl("auto", 1024, 1024, 128) == "splash"
        assert select_impl("auto", 100, 100, 128) == "xla"  # a length the kernel cannot tile
        assert select_impl("xla", 1024, 1024, 128) == "xla"
    assert ModelConfig(attention_impl="splash").attention_impl == "splash"
