"""``qkv plan --topology``: the real train step compiled by the TPU compiler on this CPU machine (libtpu
from the test extra, no TPU), its memory, collectives and cost estimate; splash attention keeps the
compiled temporaries about linear in T where XLA attention grows quadratically; no TPU noise on CPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from qkv.model import count_params
from qkv.platforms import cuda_plugin_installed
from qkv.tools.topology_plan import collective_stats, topology_plan
from qkv.train.config import MeshConfig, load_config
from qkv.train.sharding import make_mesh, resolve_rules
from qkv.train.step import Trainer


REPO = Path(__file__).resolve().parents[1]
TOPOLOGY = "v5p:2x2x1"  # 4 chips


def _qkv(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qkv.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=900, env=env)


def _no_platform_env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}


@pytest.mark.slow  # compiles for TPU or starts a process
def test_tiny_train_step_compiles_for_a_tpu_slice_quietly():
    out = _qkv("plan", "tiny", "train.batch_size=8", "--topology", TOPOLOGY, "--mesh", "fsdp=4", "--json",
               env=_no_platform_env())
    assert out.returncode == 0, out.stderr[-2000:]
    assert "TPU" not in out.stderr and "libtpu" not in out.stderr, out.stderr[:2000]  # libtpu's probe held back
    plan = json.loads(out.stdout)
    assert plan["chips"] == 4 and plan["chip"] == "TPU v5p" and plan["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    c = plan["compiled"]
    # the float32 train state (parameters, Muon's momenta, AdamW's moments for the embedding and norms), a quarter
    # per chip, counted from the trainer's own abstract state
    cfg = load_config("tiny", ["train.batch_size=8"])
    trainer = Trainer(cfg.model, cfg.optim, make_mesh(MeshConfig(data=1), jax.devices()[:1]), resolve_rules({}), 10)
    state = count_params(trainer.abstract_state) * 4 // 4
    assert state < c["arguments"] < state * 2  # TPU layouts pad small dimensions (head 64) to 128-lane tiles
    assert c["aliased"] >= 0.99 * state and plan["fits"]  # the state is donated and updated in place
    assert plan["collectives"]["all-gather"]["count"] > 0  # fsdp gathers the weights
    e = plan["estimate"]
    assert e["step_seconds"] > 0 and 0 < e["mfu"] < 1


@pytest.mark.slow  # compiles for TPU or starts a process
def test_llama_1b_shaped_step_on_a_slice():
    cfg = load_config("llama-1b", ["model.n_layers=2", "train.batch_size=4"])
    # the estimate's two extra compiles (1 and 2 layers) are exercised by the tiny test above
    plan = topology_plan(cfg, TOPOLOGY, {"data": 1, "fsdp": 4, "tensor": 1}, with_estimate=False)
    assert plan["attention"] == "splash" and plan["loss_chunk"] > 0  # the TPU defaults at T=2048, V=128k
    assert plan["fits"] and plan["compiled"]["peak"] < 95 * 2 ** 30
    # the train state dominates the arguments: 2 layers + the 128256 x 2048 tied embedding, 12 bytes per parameter
    assert plan["compiled"]["arguments"] > plan["model_parameters"] * 12 / 4
    assert plan["collectives"]["all-gather"]["bytes"] > 0


def _temporaries(attention: str, seq: int) -> int:
    cfg = load_config("llama-1b", ["model.n_layers=1", "model.vocab_size=1024", "model.d_model=256",
                                   "model.n_heads=2", "model.n_kv_heads=2", "model.head_dim=128", "model.d_ff=512",
                                   f"model.max_seq_len={seq}", f"data.seq_len={seq}", "train.batch_size=4",
                                   f"model.attention_impl={attention}", "model.remat=full"])
    plan = topology_plan(cfg, TOPOLOGY, {"data": 1, "fsdp": 4, "tensor": 1}, with_estimate=False)
    assert plan["attention"] == attention
    return plan["compiled"]["temporaries"]


@pytest.mark.slow  # compiles for TPU or starts a process
def test_splash_temporaries_grow_linearly_in_t_xla_quadratically():
    splash = _temporaries("splash", 4096) / _temporaries("splash", 1024)
    xla = _temporaries("xla", 4096) / _temporaries("xla", 1024)
    assert splash < 6, splash  # 4x the tokens: at most ~4x the memory (2.5 measured: fixed terms too)
    assert xla > 10, xla  # 16x the [T, T] scores (15.8 measured)


HLO = """HloModule m

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]) parameter(0)
  %c = s32[]{:T(128)} constant(16)
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %ag = bf16[1024,256]{1,0} all-gather(%x), channel_id=1, dimensions={0}
  %ar = (f32[128]{0}, f32[128]{0}) all-reduce(%a, %b), channel_id=2, to_apply=%add
  ROOT %t = (s32[], f32[8]) tuple(%i, %y)
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %w = (s32[], f32[8]) while(%init), condition=%cond, body=%body
  %rs = f32[64]{0} reduce-scatter(%g), channel_id=3, dimensions={0}
  ROOT %r = f32[8] get-tuple-element(%w), index=1
}
"""


def test_collectives_count_loop_bodies_once_per_trip():
    stats = collective_stats(HLO)
    assert stats["all-gather"] == {"count": 16, "bytes": 16 * 1024 * 256 * 2}
    assert stats["all-reduce"] == {"count": 16, "bytes": 16 * 2 * 128 * 4}
    assert stats["reduce-scatter"] == {"count": 1, "bytes": 64 * 4}
    assert stats["all-to-all"]["count"] == 0


def test_collectives_use_the_gpu_compilers_known_trip_count():
    """XLA's GPU compiler compares the loop counter inside a fusion; its while op states the trip count."""
    gpu = HLO.replace("  %c = s32[]{:T(128)} constant(16)\n", "").replace(
        "body=%body", 'body=%body, backend_config={"known_trip_count":{"n":"32"}}')
    stats = collective_stats(gpu)
    assert stats["all-gather"]["count"] == 32 and stats["reduce-scatter"]["count"] == 1


CUDA_PLUGIN = cuda_plugin_installed()


@pytest.mark.skipif(CUDA_PLUGIN, reason="the CUDA plugin is installed here: the compile test below runs instead")
def test_gpu_topology_without_the_cuda_plugin_is_one_line_error():
    out = _qkv("plan", "tiny", "--topology", "h100:8")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert out.stderr.startswith("qkv: error: --topology 'h100:8' needs the CUDA plugin (no GPU needed): install it "
                                 'with pip install -e ".[cuda]"'), out.stderr


@pytest.mark.slow
@pytest.mark.skipif(not CUDA_PLUGIN, reason='deviceless GPU compiles need the CUDA plugin: pip install -e ".[cuda]" '
                                            "(several GB, so not in the test extra)")
def test_llama_1b_shaped_step_compiles_for_eight_h100_without_a_gpu():
    cfg = load_config("llama-1b", ["model.n_layers=2", "train.batch_size=8"])
    plan = topology_plan(cfg, "h100:8", {"data": 1, "fsdp": 8, "tensor": 1})
    assert plan["chips"] == 8 and plan["chip"] == "NVIDIA H100 80GB HBM3" and plan["attention"] == "cudnn+pallas-gpu"
    c = plan["compiled"]
    assert c["arguments"] > plan["model_parameters"] * 12 / 8 and c["aliased"] > 0.99 * c["arguments"] * 0.9
    assert plan["fits"] and plan["hbm_per_chip"] == int(0.75 * 81559 * 2 ** 20 / 2 ** 30 * 2 ** 30)
    assert plan["collectives"]["all-gather"]["count"] > 0 and "unavailable" in plan["estimate"]


def test_estimate_refuses_a_cost_model_that_prices_two_layers_below_one(monkeypatch):
    from types import SimpleNamespace

    from qkv.tools import topology_plan as module
    times = {1: (2.0, 1e12), 2: (1.5, 2e12)}
    monkeypatch.setattr(module, "_optimal_seconds", lambda cfg, mesh, rules, n: times[n])
    cfg = load_config("tiny")
    mesh = SimpleNamespace(shape={"data": 1, "fsdp": 4, "tensor": 1})
    assert "no per-layer cost" in module.estimate(cfg, mesh, None, 10**6, "splash", 459.0)["unavailable"]
    times[2] = (2.5, 2e12)
    assert module.estimate(cfg, mesh, None, 10**6, "splash", 459.0)["step_seconds"] > 0


@pytest.mark.slow  # compiles for TPU or starts a process
def test_unknown_topology_is_one_line_error():
    out = _qkv("plan", "tiny", "--topology", "v5p-8")
    assert out.returncode == 2 and out.stderr.startswith("qkv: error: --topology 'v5p-8': use GENERATION:SHAPE")
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.slow  # compiles for TPU or starts a process
def test_cpu_users_see_no_tpu_noise():
    """libtpu is installed (the test extra) and no TPU exists: importing qkv restricts JAX to the CPU
    before it starts, so the TPU probe's errors never print; an explicit JAX_PLATFORMS still wins."""
    code = "import qkv.model, jax; print(jax.default_backend(), len(jax.devices()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_no_platform_env(),
                         timeout=300)
    assert out.returncode == 0 and out.stdout.split() == ["cpu", "1"], out.stderr
    assert out.stderr == "", out.stderr
    from qkv.platforms import restrict_platforms
    assert os.environ["JAX_PLATFORMS"] == "cpu" and restrict_platforms() is None  # explicit: left alone
