"""Benchmarks: the JSON records are complete and self-consistent, and the decode roofline is the hand count.

(The analytic FLOP count itself is checked against XLA's cost analysis in test_train.py.)
"""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from qkv.cli import main
from qkv.model import ModelConfig, count_params, create_model, split_params
from qkv.tools import roofline
from qkv.tools.benchmark import benchmark_decode, point_overrides, sweep_points
from qkv.train.metrics import flops_per_token

@pytest.fixture(autouse=True)
def small_probes(monkeypatch):
    """Smaller CPU probes than the CLI's (2048² matmul, 256 MiB copy): same code, less test time."""
    monkeypatch.setattr(roofline, "PROBE_N", 512)
    monkeypatch.setattr(roofline, "COPY_BYTES", 16 << 20)


SMALL = ["model.vocab_size=256", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64",
         "model.max_seq_len=32", "data.seq_len=32", "train.batch_size=8"]


def test_train_benchmark_json_on_one_and_eight_devices(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["benchmark", "train", "tiny", *SMALL, "--steps", "3", "--warmup", "1", "--sweep", "devices=1,8",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "devices=1" in printed and "devices=8" in printed and "MFU" in printed
    records = json.loads(out.read_text())["records"]
    assert [r["devices"] for r in records] == [1, 8]
    assert records[1]["config"]["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
    for r in records:
        assert isinstance(r["command"], str) and r["command"]
        assert r["machine"]["platform"] == "cpu" and r["machine"]["device_count"] == 8
        assert r["machine"]["cpu_count"] >= 1 and r["machine"]["device_kind"]
        assert r["versions"]["jax"] == jax.__version__ and r["versions"]["flax"]
        assert r["date"].endswith("Z") and r["compile_s"] > 0
        s = r["step_s"]
        assert 0 < s["min"] <= s["median"] <= s["max"]
        assert r["tokens_per_step"] == 8 * 32
        assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / s["median"])
        assert r["tokens_per_s_per_device"] * r["devices"] == pytest.approx(r["tokens_per_s"])
        assert r["flops_per_token"] == flops_per_token(ModelConfig(**r["config"]["model"]), 32)
        assert r["tflops_per_device"] == pytest.approx(r["flops_per_token"] * r["tokens_per_s_per_device"] / 1e12)
        # CPU: the peak is the same run's matmul rate shared among the devices used
        assert r["measured_matmul_tflops"] > 0
        assert r["peak_tflops_per_device"] == pytest.approx(r["measured_matmul_tflops"] / r["devices"])
        assert 0 < r["mfu"] < 1.5 and r["mfu_cpu_time"] > 0 and r["step_cpu_s"] > 0
        assert r["peak_memory_bytes"] is None  # the CPU backend reports no memory stats
        assert np.isfinite(r["final_loss"]) and r["params"] > 0


def test_sweep_grid_and_mesh_points():
    points = sweep_points(["remat=none,full", "mesh=1x2x1,2x1x1", "scan=true"])
    assert len(points) == 4 and points[0] == [("remat", "none"), ("mesh", "1x2x1"), ("scan", True)]
    overrides, n_devices = point_overrides(points[0] + [("devices", 2)])
    assert overrides == ["model.remat=none", "mesh.data=1", "mesh.fsdp=2", "mesh.tensor=1", "model.scan_layers=true"]
    assert n_devices == 2
    with pytest.raises(ValueError, match="key=v1,v2"):
        sweep_points(["remat"])
    with pytest.raises(ValueError, match="DATAxFSDPxTENSOR"):
        point_overrides([("mesh", "2x2")])


def test_peak_tables_follow_device_kind():
    assert roofline.lookup(roofline.PEAK_BF16_TFLOPS, "NVIDIA H100 80GB HBM3") == 989.0
    assert roofline.lookup(roofline.PEAK_BF16_TFLOPS, "NVIDIA A100-SXM4-40GB") == 312.0
    assert roofline.lookup(roofline.PEAK_BF16_TFLOPS, "TPU v5 lite") == 197.0
    assert roofline.lookup(roofline.PEAK_BF16_TFLOPS, "TPU v5p") == 459.0
    assert roofline.lookup(roofline.HBM_TBPS, "NVIDIA H200") == 4.8
    assert roofline.lookup(roofline.HBM_TBPS, "TPU v4") == 1.2
    assert roofline.lookup(roofline.PEAK_BF16_TFLOPS, "cpu") is None


def test_decode_roofline_is_the_hand_count():
    # 2 layers, d=16, 4 query heads and 2 kv heads of size 4, SwiGLU d_ff=32, vocab 64, tied, RoPE, float32.
    cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=32, max_seq_len=16)
    graphdef, params = split_params(create_model(cfg))
    per_layer = 16 * 4 * 4 * 2 + 16 * 2 * 4 * 2 + 3 * 16 * 32 + 2 * 16  # q,o + k,v + mlp + 2 norms = 2336
    n_params = 64 * 16 + 2 * per_layer + 16  # tied embedding, layers, final norm = 5712
    assert count_params(params) == n_params == 5712
    batch, prompt, new = 2, 5, 4  # 3 decode steps read 6, 7, 8 keys: 7 on average
    kv = 2 * 2 * batch * 7 * 2 * 4 * 4  # k and v, layers, rows, keys, kv heads, head size, float32
    assert roofline.weight_bytes_read(cfg, params, batch) == 4 * 5712
    assert roofline.decode_bytes_per_step(cfg, params, batch, prompt, new - 1) == 4 * 5712 + kv == 24640

    # Untied with learned positions: the two tables are only gathered, one row per sequence.
    untied = cfg.replace(tie_embeddings=False, positions="learned")
    _, p2 = split_params(create_model(untied))
    gathered = 2 * (batch * 16 * 4)
    assert roofline.weight_bytes_read(untied, p2, batch) == 4 * (count_params(p2) - 64 * 16 - 16 * 16) + gathered

    (rec,) = benchmark_decode(cfg, graphdef, params, [batch], prompt, new, repeats=1)
    assert rec["roofline_bytes_per_step"] == 24640
    lat = rec["token_latency_s"]
    assert 0 < lat["min"] <= lat["median"] <= lat["max"]
    assert rec["decode_tokens_per_s"] == pytest.approx(batch / lat["median"])
    assert rec["prefill_tokens_per_s"] == pytest.approx(batch * prompt / rec["prefill_s"])
    assert rec["bandwidth_tbps"] == rec["measured_copy_tbps"] > 0
    assert rec["roofline_step_s"] == pytest.approx(24640 / (rec["bandwidth_tbps"] * 1e12))
    assert rec["roofline_fraction"] == pytest.approx(rec["roofline_step_s"] / lat["median"])


def test_decode_cli_table_and_bad_input(tmp_path, capsys):
    out = tmp_path / "decode.json"
    assert main(["benchmark", "decode", "tiny", *SMALL, "--batch-sizes", "1,2", "--prompt-len", "4",
                 "--new-tokens", "3", "--repeats", "1", "--json", str(out)]) == 0
    assert "of roofline" in capsys.readouterr().out
    records = json.loads(out.read_text())["records"]
    assert [r["batch_size"] for r in records] == [1, 2] and records[0]["origin"] == "random parameters"
    assert main(["benchmark", "decode", "tiny", "--batch-sizes", "0"]) == 2
    assert "--batch-sizes" in capsys.readouterr().err
    assert main(["benchmark", "decode", "tiny", *SMALL, "--prompt-len", "30", "--new-tokens", "8"]) == 2
    assert "max_seq_len" in capsys.readouterr().err


def test_vs_torch_matmul_floor_counts_the_model_flops(monkeypatch):
    """docs/benchmarks/step_matmuls.py (the floor beside the PyTorch comparison) lists every matmul of a training
    step: its FLOPs are the analytic count with the causal mask's skipped half of attention added back."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "docs" / "benchmarks"))
    from step_matmuls import flops, step_matmuls

    vocab, d, layers, heads, block, batch = 65, 128, 4, 4, 64, 12  # vs_torch.py's size S
    cfg = ModelConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads, d_ff=4 * d, max_seq_len=block,
                      activation="gelu", tie_embeddings=True)
    per_token = flops_per_token(cfg, block) + 6.0 * layers * d * block  # causal 6·T·E per head → full 12·T·E
    assert flops(step_matmuls(vocab, d, layers, heads, block, batch)) == pytest.approx(per_token * block * batch)


@pytest.mark.slow
def test_generate_against_transformers_reports_both_sides_with_the_same_greedy_tokens(tmp_path, capsys):
    """`qkv benchmark generate`: the tiny preset's shape, exported by qkv's exporter and loaded by transformers;
    both sides produce exactly --new-tokens per row, their greedy tokens agree row for row, and prompts of other
    lengths in one bucket compile nothing after the first call."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    out = tmp_path / "generate.json"
    assert main(["benchmark", "generate", "tiny", *SMALL, "--batch-sizes", "1,3", "--prompt-len", "12",
                 "--new-tokens", "6", "--calls", "3", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Qwen3ForCausalLM" in printed and "qkv / transformers" in printed
    (record,) = json.loads(out.read_text())["records"]
    assert record["benchmark"] == "generate" and record["hf_class"] == "Qwen3ForCausalLM"
    assert record["versions"]["transformers"] and record["torch_threads"] >= 1
    calls = record["calls"]
    assert [(c["batch_size"], c["call"]) for c in calls] == [(b, i) for i in range(3) for b in (1, 3)]
    lengths = {tuple(c["prompt_lengths"]) for c in calls if c["batch_size"] == 3}
    assert len(lengths) == 3 and all(9 <= n <= 12 for c in calls for n in c["prompt_lengths"][:1])  # bucket 12
    for c in calls:
        assert c["agreement"] == {"rows_equal": c["batch_size"], "rows": c["batch_size"],
                                  "tokens_before_first_difference": 6 * c["batch_size"], "tokens": 6 * c["batch_size"]}
        for side in ("qkv", "transformers"):
            assert c[side]["tokens_per_s"] == pytest.approx(c["batch_size"] * 6 / c[side]["seconds"])
        assert c["ratio"] == pytest.approx(c["qkv"]["tokens_per_s"] / c["transformers"]["tokens_per_s"])
    first = [c["qkv"]["compiles"] for c in calls if c["call"] == 0]
    assert first[0] > 0  # the first call compiles prefill and step ...
    assert [s["steady"]["qkv_compiles"] for s in record["summary"]] == [0, 0]  # ... the others reuse them
    assert [s["batch_size"] for s in record["summary"]] == [1, 3]
    assert main(["benchmark", "generate", "tiny", "--checkpoint", str(tmp_path)]) == 2
    assert "not both" in capsys.readouterr().err
