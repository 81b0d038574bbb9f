"""``qkv plan``: exact per-device state bytes, XLA's compiled view of the same, clear refusals."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qkv.train.config import load_config
from qkv.tools.plan import build_plan, format_plan, parse_mesh

REPO = Path(__file__).resolve().parents[1]
LLAMA_8B_PARAMS = 8_030_261_248  # 2 x 128256 x 4096 (embed, lm_head) + 32 x 218,112,000 (blocks) + 4096 (final norm)


def _qkv(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qkv.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_llama_8b_state_bytes_match_a_hand_calculation():
    plan = build_plan(load_config("llama-8b", ["train.batch_size=8"]), parse_mesh("data=1,fsdp=8,tensor=1"),
                      compile=False)
    assert plan["model_parameters"] == LLAMA_8B_PARAMS
    # Every parameter has an embed dimension (4096) that fsdp=8 splits: exactly 1/8 of the float32 bytes each.
    assert plan["params"] == LLAMA_8B_PARAMS * 4 // 8 == 4_015_130_624
    assert plan["gradients"] == plan["params"]
    # AdamW: mu and nu like the parameters (float32), plus two replicated int32 step counters (adam, schedule).
    assert plan["optimizer"] == 2 * LLAMA_8B_PARAMS * 4 // 8 + 2 * 4
    # The analytic activations with remat=full: 32 saved bf16 residuals of 1 x 8192 x 4096 are part of it.
    assert plan["activations_layers"] > 32 * 8192 * 4096 * 2
    assert plan["activations_logits"] == 8192 * 128256 * 4 * 3
    text = format_plan(plan, "h100")
    assert "parameters            3.74 GiB" in text and "h100" in text and "tpu-v5e" not in text


def test_compiled_arguments_equal_the_exact_state_and_batch_bytes():
    plan = build_plan(load_config("tiny", ["train.batch_size=8", "data.seq_len=64"]),
                      parse_mesh("data=2,fsdp=2,tensor=2"))
    c = plan["compiled"]
    batch = 5 * 8 * 64 * 4 // 4  # five int32 [8, 64] arrays split over data x fsdp
    assert c["arguments"] == plan["params"] + plan["optimizer"] + 4 + batch  # + the int32 step
    assert c["aliased"] > 0.99 * (plan["params"] + plan["optimizer"])  # the state is donated and updated in place
    assert c["temporaries"] > plan["gradients"]


def test_plan_cli_compiles_on_virtual_devices_and_checks_the_fit():
    out = _qkv("plan", "tiny", "train.batch_size=4", "--mesh", "data=1,fsdp=4", "--device", "tpu-v5e", "--json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["devices"] == 4 and plan["compiled"]["backend"] == "cpu" and plan["fits"]["tpu-v5e"]["fits"]
    out = _qkv("plan", "llama-70b", "--mesh", "fsdp=8", "--device", "h100", "--analytic")
    assert out.returncode == 1 and "does NOT fit" in out.stdout  # 70B of float32 state over 8 devices: no


@pytest.mark.parametrize("args, message", [
    (["llama-8b", "--mesh", "tensor=3"], "qkv: error: ['blocks']['attn']['wk'] dimension 2 (kv_heads) of size 8 "
                                         "cannot be split over mesh axes tensor=3"),
    (["llama-8b", "train.batch_size=12", "--mesh", "fsdp=8"], "qkv: error: train.batch_size=12 cannot be split over "
                                                               "8 batch shards"),
    (["tiny", "--mesh", "fsdp=0"], "qkv: error: --mesh 'fsdp=0'"),
    (["tiny", "--device", "h800"], "qkv: error: --device 'h800' is unknown"),
])
def test_plan_refuses_a_mesh_that_cannot_divide_the_model_in_one_line(args, message):
    out = _qkv("plan", *args, "--analytic")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [out.stderr.strip()] and out.stderr.startswith(message), out.stderr
