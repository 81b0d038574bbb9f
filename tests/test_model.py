"""Numerical tests for qkv.model: attention kernels, the decoder forward pass, the KV cache, scan/remat, configs.

Decoding and sampling: tests/test_decode.py; the NumPy references: tests/model_reference.py.

Numerical checks compare against independent float64 NumPy code written here (not the code under
test). Configs are tiny because compile time dominates the runtime of this file.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qkv.model import (
    ModelConfig,
    attention_mask,
    create_model,
    dot_product_attention,
    init_cache,
    logical_axes,
    split_params,
)

from qkv.model.layers import layer_norm

from model_reference import (  # noqa: F401
    CONFIGS,
    LEARNED,
    PACKED_POSITIONS,
    PACKED_SEGMENTS,
    ROPE,
    SINUSOIDAL,
    T,
    build,
    jit_forward,
    np_attention_block,
    np_forward,
    np_mask,
    np_mlp,
    np_norm,
    np_rope,
    np_sinusoidal,
    np_softmax_attention,
    randomize,
    tokens_for,
)

# Donation is a no-op on CPU and JAX warns about it on every Decoder call.
pytestmark = pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")



# ----------------------------------------------------------------------------- 1-2. attention kernels


def test_attention_mask_matches_loops():
    segments = np.stack([np.ones(T, np.int32), PACKED_SEGMENTS])
    slots = np.broadcast_to(np.arange(T, dtype=np.int32), (2, T))
    got = np.asarray(attention_mask(jnp.asarray(slots), jnp.asarray(segments), jnp.asarray(segments)))
    np.testing.assert_array_equal(got, np_mask(segments))
    # cached decoding: one query at slot 5 against an 8-slot buffer whose slots 6.. are still empty (segment 0)
    k_seg = np.array([[0, 0, 1, 1, 1, 1, 0, 0]], np.int32)
    got = np.asarray(attention_mask(jnp.array([[5]]), jnp.array([[1]]), jnp.asarray(k_seg)))
    np.testing.assert_array_equal(got[0, 0], [0, 0, 1, 1, 1, 1, 0, 0])


@pytest.mark.parametrize("impl", ["xla", "reference", "auto"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_attention_kernel_matches_numpy(impl, kv_heads):
    b, h, e = 2, 4, 8
    rng = np.random.default_rng(kv_heads)
    q = rng.standard_normal((b, T, h, e)).astype(np.float32)
    k = rng.standard_normal((b, T, kv_heads, e)).astype(np.float32)
    v = rng.standard_normal((b, T, kv_heads, e)).astype(np.float32)
    slots = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (b, T))
    for segments in (np.ones((b, T), np.int32), np.stack([PACKED_SEGMENTS, np.ones(T, np.int32)])):
        mask = attention_mask(slots, jnp.asarray(segments), jnp.asarray(segments))
        got = np.asarray(dot_product_attention(q, k, v, mask, impl))
        want = np_softmax_attention(q, k, v, np_mask(segments))
        assert got.shape == (b, T, h, e) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_gqa_equals_mha_with_repeated_kv_heads(impl):
    b, h, kv, e = 2, 6, 2, 8
    rng = np.random.default_rng(7)
    q = jnp.asarray(rng.standard_normal((b, T, h, e)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, T, kv, e)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, T, kv, e)), jnp.float32)
    segments = jnp.asarray(np.stack([PACKED_SEGMENTS, np.ones(T, np.int32)]))
    mask = attention_mask(jnp.broadcast_to(jnp.arange(T), (b, T)), segments, segments)
    gqa = dot_product_attention(q, k, v, mask, impl)
    # query head i reads kv head i // (h / kv): repeat each kv head h / kv times, consecutively
    mha = dot_product_attention(q, jnp.repeat(k, h // kv, axis=2), jnp.repeat(v, h // kv, axis=2), mask, impl)
    np.testing.assert_allclose(np.asarray(gqa), np.asarray(mha), atol=1e-6, rtol=0)
    # and the grouping is not trivially satisfied: tiling (the other convention) gives a different answer
    tiled = dot_product_attention(q, jnp.tile(k, (1, 1, h // kv, 1)), jnp.tile(v, (1, 1, h // kv, 1)), mask, impl)
    assert np.abs(np.asarray(gqa) - np.asarray(tiled)).max() > 1e-2


def test_layer_norm_gradient_matches_float64_finite_differences():
    """LayerNorm's written-out gradient (model/layers.py) against central differences of the float64 NumPy
    LayerNorm, for x, scale and bias, under a random cotangent; also against JAX's own derivative."""
    rng = np.random.default_rng(3)
    x, ct = rng.standard_normal((2, 3, 8)), rng.standard_normal((2, 3, 8))
    scale, bias = 1 + 0.5 * rng.standard_normal(8), rng.standard_normal(8)
    cfg, eps = LEARNED, LEARNED.norm_eps

    def np_loss(x, scale, bias):
        return float((np_norm(cfg, x, {"scale": scale, "bias": bias}) * ct).sum())

    def central(args, i, h=1e-6):
        grad = np.zeros_like(args[i])
        for idx in np.ndindex(grad.shape):
            up, down = [a.copy() for a in args], [a.copy() for a in args]
            up[i][idx] += h
            down[i][idx] -= h
            grad[idx] = (np_loss(*up) - np_loss(*down)) / (2 * h)
        return grad

    args = (x, scale, bias)
    want = [central(args, i) for i in range(3)]
    f32 = [jnp.asarray(a, jnp.float32) for a in (*args, ct)]
    got = jax.grad(lambda x, s, b: jnp.sum(layer_norm(x, s, b, eps) * f32[3]), argnums=(0, 1, 2))(*f32[:3])
    autodiff = jax.grad(lambda x, s, b: jnp.sum(((x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(
        x.var(-1, keepdims=True) + eps) * s + b) * f32[3]), argnums=(0, 1, 2))(*f32[:3])
    np.testing.assert_allclose(np.asarray(layer_norm(*f32[:3], eps)), np_norm(cfg, x, {"scale": scale, "bias": bias}),
                               atol=1e-5)
    for g, a, w in zip(got, autodiff, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(np.asarray(g), w, atol=2e-5)
        np.testing.assert_allclose(np.asarray(g), np.asarray(a), atol=2e-5)


# ----------------------------------------------------------------------------- 3. full forward pass


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_matches_numpy_decoder(name):
    cfg = CONFIGS[name]
    _, params, forward = build(cfg)
    tokens = tokens_for(cfg)
    # row 0: one document; row 1: two packed documents and padding, positions restarting per document
    positions = np.stack([np.arange(T, dtype=np.int32), PACKED_POSITIONS])
    segments = np.stack([np.ones(T, np.int32), PACKED_SEGMENTS])
    logits, cache = forward(params, tokens, positions, segments)
    assert cache is None and logits.dtype == jnp.float32 and logits.shape == (2, T, cfg.vocab_size)
    want = np_forward(cfg, params, tokens, positions, segments)
    assert np.abs(want).max() > 1.0  # the random weights give non-trivial logits
    np.testing.assert_allclose(np.asarray(logits), want, atol=1e-4, rtol=1e-4)
    # default positions/segments are 0..T-1 and one document
    np.testing.assert_allclose(np.asarray(forward(params, tokens)[0])[0], want[0], atol=1e-4, rtol=1e-4)


def test_rope_sees_only_relative_positions():
    _, params, forward = build(ROPE)
    tokens = tokens_for(ROPE)
    positions = np.broadcast_to(np.arange(T, dtype=np.int32), (2, T))
    base = np.asarray(forward(params, tokens, positions)[0])
    shifted = np.asarray(forward(params, tokens, positions + 5)[0])
    np.testing.assert_allclose(shifted, base, atol=1e-4, rtol=1e-4)
    # while learned absolute positions do change the output
    _, lparams, lforward = build(LEARNED)
    lbase = np.asarray(lforward(lparams, tokens, positions)[0])
    assert np.abs(np.asarray(lforward(lparams, tokens, positions + 5)[0]) - lbase).max() > 1e-2


# ----------------------------------------------------------------------------- 4-5. causality, packing


def test_causality_via_learned_position_gradients():
    """d logits[:, i] / d pos_embed[j] is exactly zero for j > i and non-zero for j <= i."""
    cfg = LEARNED
    graphdef, params, _ = build(cfg)
    tokens = tokens_for(cfg, batch=1)
    probe = jnp.asarray(np.random.default_rng(3).standard_normal(cfg.vocab_size), jnp.float32)

    def outputs(pos_embed):  # [T]: a random projection of the logits at each position
        p = {**params, "pos_embed": pos_embed}
        return nnx.merge(graphdef, p)(tokens)[0][0] @ probe

    jac = jax.jit(jax.jacrev(outputs))(params["pos_embed"])  # [T, max_seq_len, d]
    norms = np.abs(np.asarray(jac)).sum(-1)  # [query i, position row j]
    for i in range(T):
        assert np.all(norms[i, i + 1:] == 0.0), f"position {i} depends on later positions: {norms[i]}"
        assert np.all(norms[i, : i + 1] > 1e-6), f"position {i} ignores some earlier position: {norms[i]}"


def test_future_tokens_do_not_change_past_logits():
    _, params, forward = build(ROPE)
    tokens = tokens_for(ROPE)
    changed = tokens.copy()
    changed[:, 5:] = (changed[:, 5:] + 1) % ROPE.vocab_size
    a, b = np.asarray(forward(params, tokens)[0]), np.asarray(forward(params, changed)[0])
    np.testing.assert_array_equal(a[:, :5], b[:, :5])
    assert np.abs(a[:, 5:] - b[:, 5:]).max() > 1e-3  # and the later logits do change


@pytest.mark.parametrize("name", ["rope", "learned"])
def test_packed_documents_do_not_attend_across(name):
    cfg = CONFIGS[name]
    _, params, forward = build(cfg)
    tokens = tokens_for(cfg, seed=5)
    packed = forward(params, tokens, np.stack([PACKED_POSITIONS] * 2), np.stack([PACKED_SEGMENTS] * 2))[0]
    # each document alone, at the start of a one-document row (the tail is causal-masked filler)
    for start, stop in ((0, 3), (3, 6)):
        alone = np.full_like(tokens, 7)
        alone[:, : stop - start] = tokens[:, start:stop]
        alone_logits = forward(params, alone)[0]
        np.testing.assert_allclose(np.asarray(packed[:, start:stop]), np.asarray(alone_logits[:, : stop - start]),
                                   atol=1e-5, rtol=1e-5)
    # sanity: without segment ids the second document does see the first
    unpacked = forward(params, tokens, np.stack([PACKED_POSITIONS] * 2))[0]
    assert np.abs(np.asarray(unpacked[:, 3:6]) - np.asarray(packed[:, 3:6])).max() > 1e-3


# ----------------------------------------------------------------------------- 6. KV cache and decoding


@pytest.mark.parametrize("name", list(CONFIGS))
def test_kv_cache_prefill_then_steps_match_full_forward(name):
    cfg = CONFIGS[name]
    _, params, forward = build(cfg)
    length, prefill = 10, 4
    tokens = tokens_for(cfg, length=length, seed=11)
    full = np.asarray(forward(params, tokens)[0])
    cache = init_cache(cfg, 2, 12)  # longer than needed: unused slots must stay masked
    logits, cache = forward(params, tokens[:, :prefill], cache=cache)
    np.testing.assert_allclose(np.asarray(logits), full[:, :prefill], atol=1e-5, rtol=1e-5)
    for i in range(prefill, length):
        logits, cache = forward(params, tokens[:, i:i + 1], cache=cache)
        np.testing.assert_allclose(np.asarray(logits[:, 0]), full[:, i], atol=1e-5, rtol=1e-5, err_msg=f"step {i}")
    assert int(cache["index"]) == length
    assert cache["k"].shape == (cfg.n_layers, 2, 12, cfg.num_kv_heads, cfg.head_size)
    np.testing.assert_array_equal(np.asarray(cache["segments"]), [[1] * length + [0, 0]] * 2)


# ----------------------------------------------------------------------------- 7. scan / remat variants


def _walk_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _walk_eqns(inner)


def test_scan_and_remat_variants_give_same_logits_and_gradients():
    cfg = ROPE
    _, params, _ = build(cfg)
    tokens = tokens_for(cfg, seed=13)
    segments = np.stack([np.ones(T, np.int32), PACKED_SEGMENTS])
    positions = np.stack([np.arange(T, dtype=np.int32), PACKED_POSITIONS])

    def make_loss(variant_cfg):
        graphdef, _ = split_params(create_model(variant_cfg))

        def loss(p):
            logits = nnx.merge(graphdef, p)(tokens[:, :-1], positions[:, :-1], segments[:, :-1])[0]
            logp = jax.nn.log_softmax(logits)
            return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean(), logits

        return loss

    variants = {
        "default": cfg,
        "unrolled": cfg.replace(scan_layers=False),
        "remat_full": cfg.replace(remat="full"),
        "remat_dots": cfg.replace(remat="dots"),
    }
    results = {}
    for name, variant in variants.items():
        loss = make_loss(variant)
        results[name] = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        eqns = list(_walk_eqns(jax.make_jaxpr(loss)(params).jaxpr))
        remats = [e for e in eqns if e.primitive.name in ("remat2", "remat", "checkpoint")]
        scans = [e for e in eqns if e.primitive.name == "scan"]
        assert bool(remats) == (variant.remat != "none"), name
        assert len(scans) == (0 if variant.scan_layers is False else 1), name
        want_policy = jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims if variant.remat == "dots" else None
        assert all(e.params["policy"] == want_policy for e in remats), name

    (ref_loss, ref_logits), ref_grads = results["default"]
    assert all(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(ref_grads))
    for name, ((loss, logits), grads) in results.items():
        np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=1e-5, rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6, err_msg=name)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4,
                                                             err_msg=name), grads, ref_grads)


# ----------------------------------------------------------------------------- 9. config validation


@pytest.mark.parametrize("changes, key", [
    (dict(n_heads=4, n_kv_heads=3), "model.n_kv_heads"),
    (dict(n_heads=4, n_kv_heads=8), "model.n_kv_heads"),
    (dict(d_model=18, n_heads=4), "model.d_model"),
    (dict(norm="batchnorm"), "model.norm"),
    (dict(positions="alibi"), "model.positions"),
    (dict(activation="tanh"), "model.activation"),
    (dict(n_layers=0), "model.n_layers"),
    (dict(dropout=1.0), "model.dropout"),
    (dict(d_model=24, n_heads=4, head_dim=3), "model.head_dim"),  # rope needs an even head size
])
def test_model_config_validation_names_the_key(changes, key):
    with pytest.raises(ValueError) as info:
        ModelConfig(**changes)
    assert key in str(info.value)
    with pytest.raises(ValueError):
        ROPE.replace(**changes)


def test_model_config_accepts_explicit_head_dim():
    cfg = ModelConfig(d_model=18, n_heads=4, head_dim=6, n_kv_heads=2)
    assert (cfg.head_size, cfg.num_kv_heads) == (6, 2)
    assert ModelConfig(n_heads=4).num_kv_heads == 4


def test_logical_axes_match_parameter_shapes():
    model = create_model(LEARNED)
    _, params = split_params(model)
    axes = logical_axes(model)
    flat_params = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    flat_axes = dict(jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: isinstance(x, tuple))[0])
    assert flat_params.keys() == flat_axes.keys()
    for path, value in flat_params.items():
        assert len(flat_axes[path]) == value.ndim, path
        if path[0].key == "blocks":
            assert flat_axes[path][0] == "layers" and value.shape[0] == LEARNED.n_layers, path


# ----------------------------------------------------------------------------- 10. bfloat16 compute


def test_bfloat16_compute_is_close_to_float32():
    cfg = ROPE
    _, params, forward32 = build(cfg)
    graphdef16, params16 = split_params(create_model(cfg.replace(dtype="bfloat16")))
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(params16))  # params stay float32
    tokens = tokens_for(cfg, seed=17)
    ref = np.asarray(forward32(params, tokens)[0])
    logits16, _ = jit_forward(graphdef16)(params, tokens)
    assert logits16.dtype == jnp.float32
    err = np.abs(np.asarray(logits16) - ref)
    scale = np.abs(ref).max()
    assert err.max() > 0  # the bf16 path really computes in lower precision
    # bf16 keeps ~3 significant digits: rounding the params alone to bf16 already moves these logits by ~0.13
    assert err.max() < 0.1 * scale and err.mean() < 0.05 * np.abs(ref).mean(), (err.max(), err.mean(), scale)
    assert np.mean(np.argmax(np.asarray(logits16), -1) == np.argmax(ref, -1)) > 0.8
    assert init_cache(cfg.replace(dtype="bfloat16"), 1, 4)["k"].dtype == jnp.bfloat16


def test_bfloat16_params_storage():
    _, params = split_params(create_model(ROPE.replace(param_dtype="bfloat16", dtype="bfloat16")))
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(params))
