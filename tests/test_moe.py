"""Mixture of experts (model/moe.py): the grouped-matmul layer against a float64 NumPy reference (forward and
gradients), capacity drops counted, router losses and per-expert shares in the train step's metrics, a tiny
MoE that learns, and the MoE's active-parameter FLOP count."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qkv.model import ModelConfig, create_model, inactive_params, moe_stats
from qkv.model.moe import MoeMlp
from qkv.train.config import MeshConfig, load_config
from qkv.train.sharding import make_mesh, resolve_rules
from qkv.train.step import Trainer

LAYER = dict(vocab_size=32, d_model=8, n_layers=1, n_heads=2, d_ff=16, max_seq_len=8, n_experts=4,
             n_experts_per_token=2, moe_d_ff=6)


def np_activation(h, kind):
    if kind == "gelu":
        return 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
    return np.maximum(h, 0)


def np_moe(p: dict[str, np.ndarray], x_nd: np.ndarray, cfg: ModelConfig, capacity: int = 0) -> np.ndarray:
    """The MoE layer token by token in float64: route, run each chosen expert on the token, weigh, add."""
    logits = x_nd @ p["router"]
    if cfg.router == "sigmoid_normalized":
        scores = 1 / (1 + np.exp(-logits))
    else:
        scores = np.exp(logits - logits.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
    taken = np.zeros(cfg.n_experts, int)
    out = np.zeros_like(x_nd)
    for n, x in enumerate(x_nd):
        chosen = np.argsort(-scores[n], kind="stable")[:cfg.n_experts_per_token]
        w = scores[n, chosen]
        if cfg.router != "softmax":
            w = w / w.sum()
        for e, we in zip(chosen, w):
            taken[e] += 1
            if capacity and taken[e] > capacity:
                continue  # dropped: over this expert's capacity (tokens in order)
            h = x @ p["wi"][e]
            if cfg.activation == "swiglu":
                g = x @ p["wg"][e]
                h = g / (1 + np.exp(-g)) * h  # silu(gate) * up
            else:
                h = np_activation(h, cfg.activation)
            out[n] += we * (h @ p["wo"][e])
        if cfg.n_shared_experts:
            g = x @ p["shared"]["wg"]
            out[n] += (g / (1 + np.exp(-g)) * (x @ p["shared"]["wi"])) @ p["shared"]["wo"]
    return out


def _layer(cfg: ModelConfig):
    layer = MoeMlp(cfg, nnx.Rngs(params=3))
    graphdef, state = nnx.split(layer)
    return graphdef, nnx.to_pure_dict(state)


def _as_np(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


@pytest.mark.parametrize("extra", [dict(), dict(router="softmax", activation="gelu"),
                                   dict(router="sigmoid_normalized", n_shared_experts=1)],
                         ids=["softmax_normalized-swiglu", "softmax-gelu", "sigmoid-shared"])
def test_grouped_matmul_layer_equals_the_float64_reference_forward_and_gradients(extra):
    cfg = ModelConfig(**LAYER, **extra)
    graphdef, params = _layer(cfg)
    x = np.random.default_rng(0).normal(size=(2, 5, 8)).astype(np.float32)
    r = np.random.default_rng(1).normal(size=(2, 5, 8)).astype(np.float32)  # a random cotangent

    def loss(params, x):
        return jnp.sum(nnx.merge(graphdef, params)(x) * r)

    y = nnx.merge(graphdef, params)(jnp.asarray(x))
    ref = np_moe(_as_np(params), x.reshape(10, 8).astype(np.float64), cfg).reshape(2, 5, 8)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-6)

    grads = jax.grad(loss, argnums=(0, 1))(params, jnp.asarray(x))
    # the reference's gradients by central differences in float64 (routing is constant under tiny changes)
    p64, x64, r64 = _as_np(params), x.astype(np.float64).reshape(10, 8), r.astype(np.float64).reshape(10, 8)
    f = lambda p, xx: float(np.sum(np_moe(p, xx, cfg) * r64))  # noqa: E731
    eps = 1e-6
    gx = np.zeros_like(x64)
    for i in np.ndindex(x64.shape):
        hi, lo = x64.copy(), x64.copy()
        hi[i] += eps
        lo[i] -= eps
        gx[i] = (f(p64, hi) - f(p64, lo)) / (2 * eps)
    np.testing.assert_allclose(np.asarray(grads[1]).reshape(10, 8), gx, rtol=1e-4, atol=1e-5)
    flat, treedef = jax.tree_util.tree_flatten_with_path(p64)
    for (path, leaf), g in zip(flat, jax.tree.leaves(grads[0]), strict=True):
        num = np.zeros_like(leaf)
        for i in np.ndindex(leaf.shape):
            for sign in (1, -1):
                moved = leaf.copy()
                moved[i] += sign * eps
                tree = jax.tree.unflatten(treedef, [moved if q == path else v for q, v in flat])
                num[i] += sign * f(tree, x64) / (2 * eps)
        np.testing.assert_allclose(np.asarray(g), num, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_capacity_drops_the_late_tokens_and_counts_them():
    cfg = ModelConfig(**LAYER, expert_capacity_factor=0.5)
    graphdef, params = _layer(cfg)
    layer = nnx.merge(graphdef, params)
    x = np.random.default_rng(0).normal(size=(1, 8, 8)).astype(np.float32)
    capacity = layer.capacity(8)
    assert capacity == 2  # ceil(0.5 * 8 tokens * 2 / 4 experts)
    y = layer(jnp.asarray(x))
    stats = moe_stats(layer)
    np.testing.assert_allclose(np.asarray(y)[0], np_moe(_as_np(params), x[0].astype(np.float64), cfg, capacity),
                               rtol=1e-5, atol=1e-6)
    # 16 assignments, at most 2 per expert kept: at least half dropped, and the share says how many exactly
    assert float(stats["dropped"]) >= 0.5 and float(stats["dropped"]) * 16 == pytest.approx(round(float(stats["dropped"]) * 16))
    assert moe_stats(layer) is None  # collected once: removed from the model
    dropless = ModelConfig(**LAYER)
    layer = nnx.merge(*_layer(dropless))
    layer(jnp.asarray(x))
    assert float(moe_stats(layer)["dropped"]) == 0.0


def test_router_statistics_of_a_uniform_router():
    """A zero router weighs every expert the same: the load-balancing loss is k at a perfectly even split, the
    z-loss log(E)^2."""
    cfg = ModelConfig(**LAYER)
    graphdef, params = _layer(cfg)
    params["router"] = jnp.zeros_like(params["router"])
    model = nnx.merge(graphdef, params)
    model(jnp.ones((1, 4, 8)))
    stats = moe_stats(model)
    np.testing.assert_allclose(float(stats["z_loss"]), np.log(4) ** 2, rtol=1e-6)
    # top-2 of four equal scores: experts 0 and 1 take every assignment -> shares [.5, .5, 0, 0], P uniform
    np.testing.assert_allclose(np.asarray(stats["expert_share"]), [0.5, 0.5, 0, 0])
    np.testing.assert_allclose(float(stats["aux_loss"]), 4 * 2 * (0.5 * 0.25 + 0.5 * 0.25), rtol=1e-6)


MOE = ["model.vocab_size=64", "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
       "model.d_ff=64", "model.max_seq_len=16", "data.seq_len=16", "train.batch_size=8", "optim.warmup_steps=0",
       "model.n_experts=4", "model.n_experts_per_token=2", "model.moe_d_ff=32", "model.router_z_loss_weight=0.001",
       "optim.name=adamw", "optim.learning_rate=1e-2"]


def _batch(b: int, t: int, seed: int = 0) -> dict[str, np.ndarray]:
    toks = np.random.default_rng(seed).integers(1, 64, (b, t + 1)).astype(np.int32)
    ones = np.ones((b, t), np.int32)
    return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": ones,
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(), "loss_mask": ones}


def run_steps(overrides: list[str], mesh_cfg: MeshConfig, n_devices: int, steps: int = 3):
    cfg = load_config("tiny", MOE + overrides)
    trainer = Trainer(cfg.model, cfg.optim, make_mesh(mesh_cfg, jax.devices()[:n_devices]),
                      resolve_rules(cfg.mesh.rules), 10)
    state, out = trainer.init_state(), []
    for i in range(steps):
        state, metrics = trainer.train_step(state, trainer.put_batch(_batch(8, 16, seed=i % 2)))
        out.append(jax.device_get(metrics))
    return out, jax.device_get(state["params"])


def test_train_step_optimises_the_router_losses_and_reports_them():
    metrics, _ = run_steps([], MeshConfig(data=1), 1, steps=6)
    first, last = metrics[0], metrics[-1]
    assert last["loss"] < first["loss"]
    shares = [first[f"moe_share_e{i}"] for i in range(4)]
    assert sum(shares) == pytest.approx(1.0) and all(0 <= s <= 1 for s in shares)
    assert 1.9 < first["moe_aux_loss"] < 4.0 and first["moe_z_loss"] > 0 and first["moe_dropped"] == 0.0
    # the loss optimised is the cross-entropy plus the weighted router losses: with zero weights it is less
    plain, _ = run_steps(["model.router_aux_loss_weight=0", "model.router_z_loss_weight=0"], MeshConfig(data=1), 1, 1)
    weighted = 0.01 * first["moe_aux_loss"] + 0.001 * first["moe_z_loss"]
    assert first["loss"] - plain[0]["loss"] == pytest.approx(weighted, rel=1e-4)


def test_moe_flops_count_active_parameters():
    from qkv.train.metrics import flops_per_token
    cfg = load_config("tiny", MOE).model
    dense = cfg.replace(n_experts=0, n_experts_per_token=1, d_ff=2 * 32)  # same as the 2 active experts of width 32
    router = 2 * 6 * 32 * 4  # 2 layers of a d x E router, 6 FLOPs per weight
    assert flops_per_token(cfg, 16) == pytest.approx(flops_per_token(dense, 16) + router)
    assert inactive_params(cfg) == 2 * (4 - 2) * 3 * 32 * 32


def test_model_without_experts_has_no_moe_stats():
    model = create_model(ModelConfig(vocab_size=32, d_model=8, n_layers=1, n_heads=2, d_ff=16, max_seq_len=8))
    model(jnp.ones((1, 4), jnp.int32))
    assert moe_stats(model) is None


@pytest.mark.parametrize("override, key", [("model.n_experts=-1", "model.n_experts"),
                                           ("model.n_experts_per_token=5", "model.n_experts_per_token"),
                                           ("model.router=topk", "model.router"),
                                           ("model.expert_capacity_factor=-1", "model.expert_capacity_factor"),
                                           ("model.router_aux_loss_weight=-0.1", "model.router_aux_loss_weight")])
def test_bad_moe_settings_are_refused_by_name(override, key):
    from qkv.errors import UserError
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        load_config("tiny", MOE + [override])


@pytest.mark.slow
def test_tiny_moe_pretrains_and_logs_its_router_metrics(corpus, tmp_path):
    from qkv.train.loop import pretrain
    run_dir = tmp_path / "moe"
    cfg = load_config("tiny", [
        "model.vocab_size=512", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64",
        "model.max_seq_len=32", "data.seq_len=32", "train.batch_size=8", "data.eval_batches=1", "train.progress=false",
        "train.sample_tokens=0", "tokenizer.train_documents=40", "data.source=files", f"data.path={corpus}",
        f"data.data_dir={tmp_path / 'tfds'}", "data.validation_fraction=0.1", f"train.run_dir={run_dir}",
        "train.steps=30", "train.log_every=5", "train.eval_every=30", "train.checkpoint_every=30",
        "optim.learning_rate=1e-2", "optim.warmup_steps=3", "model.n_experts=4", "model.moe_d_ff=32",
        "model.expert_capacity_factor=1.0"])
    pretrain(cfg)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"] - 0.5, [r["loss"] for r in train]
    for r in train:
        assert sum(r[f"moe_share_e{i}"] for i in range(4)) == pytest.approx(1.0, abs=1e-5)
        assert r["moe_aux_loss"] > 0 and r["moe_z_loss"] > 0 and 0 <= r["moe_dropped"] < 1
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


@pytest.fixture(scope="module")
def one_device_moe():
    return run_steps([], MeshConfig(data=1), 1)


@pytest.mark.parametrize("mesh_cfg", [MeshConfig(data=1, expert=4, fsdp=2), MeshConfig(data=2, expert=2, tensor=2),
                                      MeshConfig(data=8)], ids=["expert4-fsdp2", "data2-expert2-tensor2", "data8"])
def test_expert_sharded_steps_equal_one_device(mesh_cfg, one_device_moe):
    single, p1 = one_device_moe
    n = mesh_cfg.data * mesh_cfg.fsdp * mesh_cfg.tensor * mesh_cfg.expert
    sharded, p2 = run_steps([], mesh_cfg, n)
    for a, b in zip(sharded, single):
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-5, err_msg=key)
    # AdamW's normalised update turns last-bit differences of sharded reductions into up to ~lr-sized steps for a
    # parameter whose gradient is near zero (as in the dense test, tests/test_train.py): one in 8192 is 7e-5 off
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(a, b, atol=2e-4)


HF_PRESETS = {  # the published shapes, as transformers configs
    "mixtral-8x7b": ("MixtralConfig", dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                           num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                           num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=False)),
    "qwen3-30b-a3b": ("Qwen3MoeConfig", dict(vocab_size=151936, hidden_size=2048, moe_intermediate_size=768,
                                             num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                                             head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                                             tie_word_embeddings=False, decoder_sparse_step=1, mlp_only_layers=[])),
    "olmoe-1b-7b": ("OlmoeConfig", dict(vocab_size=50304, hidden_size=2048, intermediate_size=1024,
                                        num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
                                        num_experts=64, num_experts_per_tok=8, norm_topk_prob=False,
                                        tie_word_embeddings=False)),
}


@pytest.mark.parametrize("name", sorted(HF_PRESETS))
def test_moe_presets_count_the_parameters_transformers_counts(name):
    """Built on the meta device (no memory): the same count, and the same active count."""
    torch = pytest.importorskip("torch")
    import transformers
    from qkv.model import abstract_model, count_params, split_params
    kind, fields = HF_PRESETS[name]
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(getattr(transformers, kind)(**fields))
    named = dict(hf.named_parameters())
    cfg = load_config(name).model
    ours = count_params(split_params(abstract_model(cfg))[1])
    assert ours == sum(p.numel() for p in named.values())
    # active: the router, k of the experts, attention, norms, embeddings and head
    expert = sum(p.numel() for k, p in named.items() if ".mlp.experts." in k) // cfg.n_experts
    assert ours - inactive_params(cfg) == ours - (cfg.n_experts - cfg.n_experts_per_token) * expert


@pytest.mark.slow
def test_train_benchmark_reports_mfu_from_active_parameters(tmp_path, capsys):
    from qkv.cli import main
    from qkv.train.metrics import flops_per_token
    out = tmp_path / "bench.json"
    moe = ["model.vocab_size=256", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64",
           "model.max_seq_len=32", "data.seq_len=32", "train.batch_size=8", "model.n_experts=8", "model.moe_d_ff=32"]
    assert main(["benchmark", "train", "tiny", *moe, "--steps", "2", "--warmup", "1", "--json", str(out)]) == 0
    assert "MFU" in capsys.readouterr().out
    (r,) = json.loads(out.read_text())["records"]
    cfg = load_config("tiny", moe).model
    assert r["active_params"] == r["params"] - inactive_params(cfg) < r["params"]
    assert r["flops_per_token"] == flops_per_token(cfg, 32)  # 6 x active weights + attention
    dense_all = flops_per_token(cfg.replace(n_experts=0, n_experts_per_token=1, d_ff=8 * 32), 32)
    assert r["flops_per_token"] < dense_all  # not 6 x every expert's weights
    assert r["tflops_per_device"] == pytest.approx(r["flops_per_token"] * r["tokens_per_s_per_device"] / 1e12)
    assert 0 < r["mfu"] < 1.5


def test_cached_decoding_of_a_moe_equals_the_full_forward():
    from qkv.model import init_cache, split_params
    cfg = ModelConfig(**{**LAYER, "n_layers": 2})
    model = create_model(cfg)
    toks = jnp.asarray(np.random.default_rng(0).integers(1, 32, (2, 8)), jnp.int32)
    full = model(toks)[0]
    graphdef, params = split_params(model)
    step = jax.jit(lambda p, t, cache: nnx.merge(graphdef, p)(t, cache=cache))
    logits, cache = step(params, toks[:, :5], init_cache(cfg, 2, 8))
    out = [logits]
    for i in range(5, 8):
        logits, cache = step(params, toks[:, i:i + 1], cache)
        out.append(logits)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(out, 1)), np.asarray(full), atol=1e-5)


@pytest.mark.slow
def test_mixtral_8x7b_compiles_for_a_v5p_128_slice_with_expert_parallelism():
    """The preset's train step (expert=8 x fsdp=16) compiled by the TPU compiler: about 6 min of CPU."""
    pytest.importorskip("libtpu")
    from qkv.tools.topology_plan import topology_plan
    plan = topology_plan(load_config("mixtral-8x7b"), "v5p:4x4x8", None, with_estimate=False)
    assert plan["mesh"] == {"data": 1, "fsdp": 16, "expert": 8, "tensor": 1} and plan["fits"]
    assert plan["model_parameters"] == 46_702_792_704
    assert plan["collectives"]["all-gather"]["count"] > 0  # the expert axis' token gathers, fsdp's weight gathers
