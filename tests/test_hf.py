"""Hugging Face interop: parity with the real `transformers` models, exact round trips, clear refusals."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import qkv  # noqa: E402
from qkv.inference.decode import Decoder, SamplingConfig  # noqa: E402
from qkv.tools.convert import export_hf, import_hf, load_params  # noqa: E402

SHAPES = {
    "llama-gqa-untied": ("llama", dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       rope_theta=1000.0, tie_word_embeddings=False)),
    "llama-mha-tied": ("llama", dict(vocab_size=61, hidden_size=24, intermediate_size=40, num_hidden_layers=3,
                                     num_attention_heads=3, num_key_value_heads=3, max_position_embeddings=32,
                                     rope_theta=10000.0, tie_word_embeddings=True, rms_norm_eps=1e-5)),
    "llama-head-dim": ("llama", dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                     max_position_embeddings=32, rope_theta=500000.0)),
    "gpt2": ("gpt2", dict(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                          eos_token_id=1)),
}


def make_hf(kind: str, kwargs: dict, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs))
    else:
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**kwargs))
    with torch.no_grad():  # random, non-trivial norms and biases so every tensor matters
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p) if "weight" in name else 0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module", params=list(SHAPES))
def converted(request, tmp_path_factory):
    kind, kwargs = SHAPES[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    hf = make_hf(kind, kwargs)
    hf.save_pretrained(tmp / "hf")
    import_hf(tmp / "hf", tmp / "run")
    return kind, hf, tmp


def test_logits_match_transformers(converted):
    kind, hf, tmp = converted
    lm = qkv.load(tmp / "run")
    ids = np.random.default_rng(1).integers(0, hf.config.vocab_size, (2, 12))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    assert np.abs(lm.logits(ids) - ref).max() <= 1e-4


def test_greedy_generation_matches_transformers(converted):
    kind, hf, tmp = converted
    lm = qkv.load(tmp / "run")
    prompt = np.random.default_rng(2).integers(3, hf.config.vocab_size, (1, 5))
    with torch.no_grad():
        ref = hf.generate(torch.tensor(prompt), max_new_tokens=8, do_sample=False, eos_token_id=None,
                          pad_token_id=0, attention_mask=torch.ones_like(torch.tensor(prompt)))
    decoder = Decoder(lm.config.model, lm.graphdef, SamplingConfig(temperature=0.0, max_new_tokens=8))
    ours = decoder.generate(lm.params, prompt.tolist(), pad_id=0, eos_id=None)[0]
    assert ours == ref[0, 5:].tolist()


def test_export_loads_in_transformers_and_reimports_exactly(converted):
    kind, hf, tmp = converted
    export_hf(tmp / "run", tmp / "exported", kind)
    config = json.loads((tmp / "exported" / "config.json").read_text())
    assert config["model_type"] == kind
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp / "exported").eval()
    ids = torch.tensor(np.random.default_rng(3).integers(0, hf.config.vocab_size, (1, 10)))
    with torch.no_grad():
        np.testing.assert_array_equal(again(ids).logits.numpy(), hf(ids).logits.numpy())
    import_hf(tmp / "exported", tmp / "reimported")
    _, first, _ = load_params(tmp / "run")
    _, second, _ = load_params(tmp / "reimported")
    assert jax.tree.structure(first) == jax.tree.structure(second)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
        np.testing.assert_array_equal(a, b)


def test_refusals_name_the_problem(tmp_path):
    kind, kwargs = SHAPES["llama-gqa-untied"]
    hf = make_hf(kind, kwargs)
    hf.save_pretrained(tmp_path / "hf")
    # A config.json that disagrees with the stored weights: the first mismatching parameter is named.
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["intermediate_size"] = 50
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"\['blocks'\]\['mlp'\]\['wg'\] has shape \(2, 32, 48\)"):
        import_hf(tmp_path / "hf", tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints" / "0").exists()
    # Pickle checkpoints are refused, never loaded.
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text(json.dumps(config))
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="pickle files, which qkv never loads"):
        import_hf(tmp_path / "bin", tmp_path / "run2")
    config["model_type"] = "bert"
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model_type 'bert' is not supported"):
        import_hf(tmp_path / "hf", tmp_path / "run3")
