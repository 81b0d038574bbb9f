"""What `qkv pretrain` trains exports: the default `tiny` preset's model (scale-free per-head QK-norm) goes through
`qkv convert export --arch qwen3` and transformers' logits equal qkv's; `--arch llama` refuses it naming qwen3."""
from __future__ import annotations

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import qkv  # noqa: E402
from qkv.cli import main  # noqa: E402
from qkv.model import create_model, split_params  # noqa: E402
from qkv.train import checkpoint  # noqa: E402
from qkv.train.config import load_config  # noqa: E402


def run_cli(capsys, *args: str) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(list(args))
    return code, capsys.readouterr().err.strip().splitlines()


def logit_diff(hf_model, run_dir, vocab: int) -> float:
    ids = np.random.default_rng(1).integers(2, vocab, (2, 20))
    with torch.no_grad():
        ref = hf_model(torch.tensor(ids)).logits.numpy()
    return float(np.abs(qkv.load(run_dir).logits(ids) - ref).max())


def test_the_tiny_preset_exports_as_qwen3_and_llama_refuses_it_by_name(tmp_path, capsys):
    cfg = load_config("tiny", ["model.vocab_size=512", "model.n_layers=2"])  # the default shape, a smaller vocabulary
    assert cfg.model.qk_norm == "rms"
    _, params = split_params(create_model(cfg.model, seed=3))
    params = jax.tree.map(np.asarray, params)
    checkpoint.save_params(tmp_path / "run", params, {"config": cfg.to_dict(), "step": 0}, step=0)
    code, err = run_cli(capsys, "convert", "export", str(tmp_path / "run"), str(tmp_path / "llama"), "--arch", "llama")
    assert code == 2 and len(err) == 1 and "model.qk_norm" in err[0] and "qwen3" in err[0], err
    assert not (tmp_path / "llama").exists()
    code, err = run_cli(capsys, "convert", "export", str(tmp_path / "run"), str(tmp_path / "out"), "--arch", "qwen3")
    assert code == 0, err
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert type(exported).__name__ == "Qwen3ForCausalLM"
    assert logit_diff(exported, tmp_path / "run", 512) <= 1e-4
