"""Real-size Hugging Face round trip without a download: Llama-3.2-1B- and GPT-2-124M-shaped random checkpoints built
with transformers (bfloat16, sharded safetensors), imported, compared with transformers on a few tokens (≤ 1e-4),
exported and reloaded. Import and export run in child processes that report their wall time and peak RSS
(recorded in docs/benchmarks.md).

Several GB of memory and minutes of CPU: runs only with QKV_REAL_SIZE=1 (``QKV_REAL_SIZE=1 python -m pytest -q -s
tests/test_hf_real_size.py``), not in the 15-minute suite.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(os.environ.get("QKV_REAL_SIZE") != "1", reason="set QKV_REAL_SIZE=1 (GBs, minutes)")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SHAPES = {
    "llama-3.2-1b": ("llama", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                                   max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
                                   bos_token_id=128000, eos_token_id=128001,
                                   rope_parameters={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                                                    "rope_theta": 500000.0})),
    "gpt2-124m": ("gpt2", dict(vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024,
                               bos_token_id=50256, eos_token_id=50256)),
}

CHILD = """
import json, resource, sys, time
start = time.perf_counter()
from qkv.tools.convert import export_hf, import_hf
args = json.loads(sys.argv[1])
what = args.pop("what")
if what == "logits":  # one CPU device: qkv.load replicates parameters over all local devices
    import numpy as np, qkv
    np.save(args["out"], qkv.load(args["run_dir"]).logits(np.load(args["ids"])))
else:
    (import_hf if what == "import" else export_hf)(**args)
print(json.dumps({"seconds": round(time.perf_counter() - start, 1),
                  "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}))
"""


def measured(**args) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True, env=env,
                         timeout=3600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def hf_logits(path, ids: np.ndarray) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize("name", list(SHAPES))
def test_real_size_round_trip(name, tmp_path):
    kind, kwargs = SHAPES[name]
    config = (transformers.LlamaConfig if kind == "llama" else transformers.GPT2Config)(**kwargs)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "hf", max_shard_size="1GB")
    del model
    gc.collect()
    shards = sorted(p.name for p in (tmp_path / "hf").glob("*.safetensors"))
    ids = np.random.default_rng(0).integers(0, kwargs["vocab_size"], (1, 8))
    ref = hf_logits(tmp_path / "hf", ids)

    imported = measured(what="import", hf_dir=str(tmp_path / "hf"), run_dir=str(tmp_path / "run"))
    np.save(tmp_path / "ids.npy", ids)
    measured(what="logits", run_dir=str(tmp_path / "run"), ids=str(tmp_path / "ids.npy"),
             out=str(tmp_path / "ours.npy"))
    diff = float(np.abs(np.load(tmp_path / "ours.npy") - ref).max())
    exported = measured(what="export", run_dir=str(tmp_path / "run"), out_dir=str(tmp_path / "out"), arch_name=kind)
    again = hf_logits(tmp_path / "out", ids)
    report = {"shape": name, "shards": len(shards), "max_abs_logit_diff": diff,
              "export_vs_source": float(np.abs(again - ref).max()), "import": imported, "export": exported}
    print(json.dumps(report))
    assert diff <= 1e-4
    np.testing.assert_array_equal(again, ref)  # bf16 -> float32 -> float32 file: the same numbers
    assert json.loads((tmp_path / "out" / "config.json").read_text())["eos_token_id"] == kwargs["eos_token_id"]
