"""Fine-tuned and freshly trained runs leave qkv as the family they are: a short SFT from an imported Qwen 3 and an
imported Gemma 2 exports, and transformers' logits equal qkv's (nothing dropped on the way out); the default `tiny`
preset's model (scale-free per-head QK-norm) exports exactly as Qwen 3, and `--arch llama` refuses it naming qwen3."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import qkv  # noqa: E402
from qkv.cli import main  # noqa: E402
from qkv.model import create_model, split_params  # noqa: E402
from qkv.train import checkpoint  # noqa: E402
from qkv.train.config import load_config  # noqa: E402

TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=1)
FAMILIES = {
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(TINY, head_dim=16, tie_word_embeddings=False)),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(TINY, head_dim=16, query_pre_attn_scalar=24,
                                                          sliding_window=6, attn_logit_softcapping=2.0,
                                                          final_logit_softcapping=3.0)),
}


def run_cli(capsys, *args: str) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(list(args))
    return code, capsys.readouterr().err.strip().splitlines()


def logit_diff(hf_model, run_dir, vocab: int) -> float:
    ids = np.random.default_rng(1).integers(2, vocab, (2, 20))
    with torch.no_grad():
        ref = hf_model(torch.tensor(ids)).logits.numpy()
    return float(np.abs(qkv.load(run_dir).logits(ids) - ref).max())


def byte_bpe() -> tokenizers.Tokenizer:
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<bos>", "<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["def f(x):\n    return x + 1\n"] * 20, trainer)
    return tok


@pytest.mark.slow  # two short trainings
@pytest.mark.parametrize("family", list(FAMILIES))
def test_sft_from_an_imported_checkpoint_exports_to_transformers(family, tmp_path, capsys):
    cls, config_cls, fields = FAMILIES[family]
    tok = byte_bpe()
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**fields, vocab_size=tok.get_vocab_size())
    config._attn_implementation = "eager"
    hf = getattr(transformers, cls)(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "eos_token": "<eos>"}))
    assert run_cli(capsys, "convert", "import", str(tmp_path / "hf"), str(tmp_path / "base"))[0] == 0
    records = [{"prompt": f"def f{i}(x):", "response": f"    return x + {i}\n"} for i in range(24)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    code, err = run_cli(capsys, "finetune", "sft-tiny", f"finetune.init_from={tmp_path / 'base'}",
                        f"finetune.train_path={tmp_path / 'sft.jsonl'}", f"train.run_dir={tmp_path / 'sft'}",
                        "train.steps=3", "train.batch_size=8", "data.seq_len=32", "optim.learning_rate=3e-2",
                        "optim.warmup_steps=1", "train.eval_every=100", "train.checkpoint_every=100",
                        "train.sample_tokens=4")
    assert code == 0, err[-5:]
    code, err = run_cli(capsys, "convert", "export", str(tmp_path / "sft"), str(tmp_path / "out"), "--arch", family)
    assert code == 0, err
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert type(exported).__name__ == cls
    tuned = logit_diff(exported, tmp_path / "sft", config.vocab_size)
    assert tuned <= 1e-4
    assert logit_diff(hf, tmp_path / "sft", config.vocab_size) > 100 * max(tuned, 1e-6)  # the SFT changed the model


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
