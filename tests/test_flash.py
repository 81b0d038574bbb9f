"""Flash-attention kernels (model/flash.py) in Pallas interpret mode equal ``reference_attention``:
forward and gradients, causal and bidirectional, packed segments, padding, grouped-query heads, sliding
windows, soft-caps and an explicit scale; also per shard under the train step's layout (shard_map), and
what ``auto`` picks per platform, shape, feature and mesh rules (with the reason)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from qkv.model import ModelConfig
from qkv.errors import UserError
from qkv.model import flash
from qkv.model.attention import Mask, choose_impl, dot_product_attention, reference_attention, select_impl
from qkv.train.config import MeshConfig
from qkv.train.sharding import LOGICAL_RULES, activation_layout, make_mesh

B, T, H, E = 2, 128, 4, 64


def inputs(kv_heads: int, causal: bool, seed: int = 0, t: int = T, b: int = B, h: int = H):
    rng = np.random.default_rng(seed)
    q, k, v, ct = (jnp.asarray(rng.normal(size=s), jnp.float32)
                   for s in [(b, t, h, E), (b, t, kv_heads, E), (b, t, kv_heads, E), (b, t, h, E)])
    seg = np.ones((b, t), np.int32)
    seg[0, 50:], seg[0, 100:] = 2, 3  # three packed documents
    seg[-1, t - 38:] = 0  # padding
    seg = jnp.asarray(seg)
    return q, k, v, ct, Mask(jnp.broadcast_to(jnp.arange(t), (b, t)) if causal else None, seg, seg)


def max_errors(impl: str, q, k, v, ct, mask, wrap=lambda f: f, **features):
    def loss(attend):
        return lambda q, k, v: jnp.sum(attend(q, k, v) * ct)
    kernel = wrap(lambda q, k, v: dot_product_attention(q, k, v, mask, impl, **features))
    ref_features = {name: x for name, x in features.items() if name != "window"}
    reference = lambda q, k, v: reference_attention(q, k, v, mask.dense(features.get("window", 0)),  # noqa: E731
                                                    **ref_features)
    out, ref = jax.jit(kernel)(q, k, v), reference(q, k, v)
    grads = jax.jit(jax.grad(loss(kernel), argnums=(0, 1, 2)))(q, k, v)
    ref_grads = jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v)
    return [float(jnp.max(jnp.abs(a - b))) for a, b in zip((out, *grads), (ref, *ref_grads))]


@pytest.mark.slow  # Pallas interpret mode
@pytest.mark.parametrize("impl, kv_heads, causal", [
    ("splash", 2, True), ("splash", 4, False), ("cudnn", 2, True), ("cudnn", 1, False)])
def test_kernel_equals_reference_forward_and_gradients(impl, kv_heads, causal):
    assert choose_impl(impl, T, T, E, causal=causal, platform="cpu").impl == impl  # the kernel, not a fallback
    errors = max_errors(impl, *inputs(kv_heads, causal))
    assert max(errors) < 2e-5, errors  # float32 values of order 1


@pytest.mark.slow  # Pallas interpret mode
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


@pytest.mark.slow  # builds the TPU compiler's devices
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


@pytest.mark.slow  # Pallas interpret mode
@pytest.mark.parametrize("impl, kv_heads, causal", [("splash", 1, True), ("splash", 2, False)])
def test_splash_with_window_softcap_and_scale_equals_reference(impl, kv_heads, causal):
    """Sliding window 64 over T=256 (LocalMask: whole blocks outside the window are skipped), Gemma 2's
    soft-cap and an explicit scale; forward and gradients."""
    q, k, v, ct, mask = inputs(kv_heads, causal, seed=3, t=256, b=1, h=2)
    q = 3 * q  # scores of order 10: the cap of 5 changes them
    features = dict(window=64, softcap=5.0, scale=0.2)
    assert choose_impl(impl, 256, 256, E, causal=causal, platform="cpu", window=64, softcap=5.0).impl == "splash"
    errors = max_errors(impl, q, k, v, ct, mask, **features)
    assert max(errors) < 5e-5, errors
    uncapped = max_errors(impl, q, k, v, ct, mask, window=64, scale=0.2)
    assert max(uncapped) < 5e-5, uncapped
    dense = mask.dense(64)  # and the cap matters at these scores
    assert float(jnp.max(jnp.abs(reference_attention(q, k, v, dense, scale=0.2, softcap=5.0)
                                 - reference_attention(q, k, v, dense, scale=0.2)))) > 1e-2


def test_splash_blocks_divide_every_length_it_accepts():
    """The block along T is the largest multiple of 128 up to 512 that divides T (min(512, T) does not
    divide 640, 768, 896 or 1280)."""
    want = {128: 128, 256: 256, 384: 384, 512: 512, 640: 128, 768: 384, 896: 128, 1024: 512, 1280: 256, 1536: 512}
    for t, block in want.items():
        assert flash.splash_block(t) == block and t % block == 0
        assert choose_impl("auto", t, t, 128, platform="tpu") == ("splash", "splash", "")
    assert choose_impl("auto", 100, 100, 128, platform="tpu") == ("xla", "xla", "splash: length 100 is not a multiple of 128")
    assert choose_impl("auto", 128, 128, 32, platform="tpu").impl == "xla"  # head size 32


@pytest.mark.slow  # Pallas interpret mode
def test_splash_at_a_length_min_512_does_not_divide():
    q, k, v, ct, mask = inputs(1, causal=True, seed=5, t=640, b=1, h=1)
    out = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, mask, "splash"))(q, k, v)
    np.testing.assert_allclose(np.asarray(out), np.asarray(reference_attention(q, k, v, mask.dense())), atol=2e-5)


def test_gpu_selection_by_dtype_shape_and_features():
    """On GPU: cuDNN (bf16/fp16) for rows of one document, the Pallas GPU kernel for packed rows where it
    tiles the length and has the features, else jax's XLA attention for them; a soft-cap goes to XLA."""
    bf16, f32 = jnp.bfloat16, jnp.float32

    def gpu(t, dtype, **features):
        return choose_impl("auto", t, t, 128, dtype=dtype, platform="gpu", **features)

    assert gpu(256, bf16) == ("cudnn", "cudnn+pallas-gpu", "")
    assert gpu(200, bf16) == ("cudnn", "cudnn+xla",
                              "packed rows on xla: the Pallas GPU kernel tiles lengths in multiples of 128, not 200")
    assert gpu(256, f32) == ("cudnn", "pallas-gpu", "cuDNN takes bfloat16/float16, not float32")
    assert gpu(200, f32).impl == "xla" and "not 200" in gpu(200, f32).reason
    assert gpu(256, bf16, window=64) == ("cudnn", "cudnn+xla", "packed rows on xla: the Pallas GPU kernel has no sliding window")
    assert gpu(256, bf16, window=64, causal=False).impl == "xla"  # cuDNN's window is causal only
    capped = gpu(256, bf16, softcap=50.0)
    assert capped.impl == "xla" and "no soft-cap" in capped.reason
    assert choose_impl("cudnn", 256, 256, 128, dtype=bf16, platform="gpu", softcap=50.0).impl == "xla"
    assert choose_impl("auto", 256, 256, 128, platform="tpu", window=64, softcap=50.0).impl == "splash"
    assert choose_impl("auto", 256, 256, 128, platform="cpu") == ("xla", "xla", "auto: no flash kernel for cpu")
    assert select_impl("xla", 256, 256, 128, platform="tpu") == "xla"
    assert choose_impl("auto", 256, 512, 128, dtype=bf16, platform="gpu").impl == "xla"  # one length only


def test_gpu_path_at_a_length_its_kernel_cannot_tile():
    """T = 200 (not a multiple of the Pallas GPU kernel's 128 block), and a sliding window (which it has
    not): the GPU path runs its packed rows on jax's XLA attention instead of failing to trace; forward
    and gradients (interpret mode: the packed-rows path for every row)."""
    q, k, v, ct, mask = inputs(2, causal=True, seed=2, t=200, b=2, h=4)
    q, k, v = (a.astype(jnp.bfloat16) for a in (q, k, v))
    for features in ({}, {"window": 48, "scale": 0.1}):
        assert choose_impl("cudnn", 200, 200, E, dtype=jnp.bfloat16, platform="gpu").kernels == "cudnn+xla"
        errors = max_errors("cudnn", q, k, v, ct.astype(jnp.bfloat16), mask, **features)
        assert max(errors) < 7e-2, (features, errors)  # bfloat16: two ulps at the gradients' size (~8)


def test_single_document_rows():
    seg = jnp.array([[1, 1, 1, 0], [4, 4, 4, 4], [2, 2, 0, 0]])
    single, lengths = flash.single_document_rows(seg)
    assert bool(single) and lengths.tolist() == [3, 4, 2]
    for packed in ([[1, 1, 2, 2]], [[1, 1, 0, 1]], [[0, 0, 0, 0]], [[0, 1, 1, 1]]):  # two documents; a gap; empty
        assert not bool(flash.single_document_rows(jnp.array(packed))[0]), packed


@pytest.mark.parametrize("rules", [{"length": "tensor"}, {"head_dim": "tensor", "heads": None}])
def test_kernels_refuse_mesh_rules_that_split_length_or_head_dim(rules):
    """A kernel runs per shard in shard_map: split along the sequence it would attend within each chunk,
    split along head_dim it would add up partial dot products. auto runs XLA; a named kernel is refused."""
    from qkv.train.sharding import resolve_rules

    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=2), jax.devices()[:4])
    q, k, v, ct, mask = inputs(2, causal=True, seed=1)
    with activation_layout(mesh, resolve_rules(rules)):
        for impl in ("splash", "cudnn"):
            with pytest.raises(UserError, match=f"model.attention_impl={impl}: .*mesh.rules"):
                dot_product_attention(q, k, v, mask, impl)
        choice = choose_impl("auto", T, T, E, platform="tpu")
        assert choice.impl == "xla" and choice.reason.startswith(f"mesh.rules split {next(iter(rules))}")
        out = dot_product_attention(q, k, v, mask, "auto")  # CPU mesh: xla in any case; the same numbers
    np.testing.assert_allclose(np.asarray(out), np.asarray(reference_attention(q, k, v, mask.dense())), atol=2e-5)
    with activation_layout(mesh, LOGICAL_RULES):  # the default rules split neither
        assert choose_impl("auto", T, T, E, platform="tpu").impl == "splash"


@pytest.mark.slow  # compiles for TPU
def test_splash_with_window_and_softcap_compiles_for_tpu():
    """The real TPU compiler (libtpu, no TPU): splash with a LocalMask and a soft-cap, forward and backward,
    at T = 640 (blocks of 128) over a v5p slice's layout."""
    from qkv.tools.topology_plan import topology_devices

    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=1), topology_devices("v5p:2x2x1"))
    t, h, e = 640, 2, 128
    batch, rows = NamedSharding(mesh, PartitionSpec("fsdp")), 4
    q, k, v = (jax.ShapeDtypeStruct((rows, t, h, e), jnp.bfloat16, sharding=batch) for _ in range(3))
    seg = jax.ShapeDtypeStruct((rows, t), jnp.int32, sharding=batch)

    def loss(q, k, v, seg):
        with activation_layout(mesh, LOGICAL_RULES):
            assert choose_impl("auto", t, t, e, window=128, softcap=50.0) == ("splash", "splash", "")
            mask = Mask(jnp.broadcast_to(jnp.arange(t), seg.shape), seg, seg)
            out = dot_product_attention(q, k, v, mask, "auto", window=128, softcap=50.0, scale=0.0625)
            return jnp.sum(out.astype(jnp.float32))

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v, seg).compile()
    assert "tpu_custom_call" in compiled.as_text()  # the Mosaic kernel, not XLA's attention


@pytest.mark.slow  # compiles the train step for TPU
def test_topology_plan_compiles_splash_at_t_640():
    """``qkv plan --topology v5p:2x2x1`` at a length min(512, T) does not divide: splash runs (blocks of
    128) and the plan says so."""
    from qkv.tools.topology_plan import format_topology_plan, topology_plan
    from qkv.train.config import load_config

    cfg = load_config("llama-1b", ["model.n_layers=1", "model.vocab_size=1024", "model.d_model=256", "model.n_heads=2",
                                   "model.n_kv_heads=2", "model.head_dim=128", "model.d_ff=512",
                                   "model.max_seq_len=640", "data.seq_len=640", "train.batch_size=4"])
    plan = topology_plan(cfg, "v5p:2x2x1", {"data": 1, "fsdp": 4, "tensor": 1}, with_estimate=False)
    assert plan["attention"] == "splash" and plan["attention_reason"] == "" and plan["fits"]
    assert "attention splash," in format_topology_plan(plan)
    cfg = load_config("llama-1b", ["model.n_layers=1", "model.vocab_size=1024", "model.d_model=256", "model.n_heads=2",
                                   "model.n_kv_heads=2", "model.head_dim=128", "model.d_ff=512",
                                   "model.max_seq_len=200", "data.seq_len=200", "train.batch_size=4"])
    plan = topology_plan(cfg, "v5p:2x2x1", {"data": 1, "fsdp": 4, "tensor": 1}, with_estimate=False)
    assert plan["attention"] == "xla" and plan["attention_reason"] == "splash: length 200 is not a multiple of 128"
    assert "attention xla (splash: length 200 is not a multiple of 128)," in format_topology_plan(plan)


def test_cpu_plan_reports_the_attention_that_runs():
    """``qkv plan`` (the CPU compile) names the attention that ran and why."""
    from qkv.tools.plan import build_plan, format_plan
    from qkv.train.config import load_config

    plan = build_plan(load_config("tiny", ["train.batch_size=2"]), {"data": 1, "fsdp": 1, "tensor": 1}, compile=False)
    assert plan["attention"] == "xla" and plan["attention_reason"] == "auto: no flash kernel for cpu"
    assert "attention xla (auto: no flash kernel for cpu)" in format_plan(plan)
