"""Qwen 2, Qwen 3, Mistral, Gemma 2, Gemma 3 (text) and OLMo 2 against transformers: tiny random models built by
transformers in the test (float32, eager attention), imported, and compared — logits over a padded batch (≤ 1e-4),
24 greedy tokens with the KV cache (past the sliding window of the local families), export → transformers reload
with every tensor bit for bit, and a bfloat16 checkpoint that imports."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import qkv  # noqa: E402
from qkv.inference.decode import Decoder, SamplingConfig  # noqa: E402
from qkv.tools.convert import export_hf, import_hf  # noqa: E402

BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
WINDOW = 4  # shorter than the 30 tokens of the generation test, so the window matters
GEMMA = dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW, num_hidden_layers=3,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)

# family: (transformers model class, config class, config fields)
FAMILIES = {
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(BASE, rope_theta=1000.0, tie_word_embeddings=False)),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(BASE, head_dim=16, tie_word_embeddings=True)),
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(BASE, sliding_window=WINDOW)),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(BASE, **GEMMA, attn_logit_softcapping=2.0,
                                                          final_logit_softcapping=3.0)),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(
        BASE, **GEMMA, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})),
    "olmo2": ("Olmo2ForCausalLM", "Olmo2Config", dict(BASE, pad_token_id=0)),
}


def make_hf(family: str, seed: int = 0):
    cls, config_cls, fields = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**fields)
    config._attn_implementation = "eager"  # the plain-math reference path
    model = getattr(transformers, cls)(config)
    with torch.no_grad():  # random, non-trivial norms and biases so every tensor matters
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_((1.0 if "weight" in name and "gemma" not in family else 0.0) + 0.2 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module", params=list(FAMILIES))
def converted(request, tmp_path_factory):
    family = request.param
    tmp = tmp_path_factory.mktemp(family)
    hf = make_hf(family)
    hf.save_pretrained(tmp / "hf")
    import_hf(tmp / "hf", tmp / "run")
    return family, hf, tmp


def test_logits_match_transformers_over_a_padded_batch(converted):
    family, hf, tmp = converted
    lm = qkv.load(tmp / "run")
    rng = np.random.default_rng(1)
    ids = rng.integers(3, hf.config.vocab_size, (3, 12))
    lengths = np.array([12, 7, 9])
    valid = np.arange(12)[None, :] < lengths[:, None]
    ids = np.where(valid, ids, 0)  # right padding, masked out on the transformers side
    with torch.no_grad():
        ref = hf(torch.tensor(ids), attention_mask=torch.tensor(valid.astype(np.int64))).logits.numpy()
    ours = lm.logits(ids)
    assert np.abs(ours - ref)[valid].max() <= 1e-4


def test_greedy_decoding_with_the_cache_matches_transformers(converted):
    family, hf, tmp = converted
    lm = qkv.load(tmp / "run")
    prompt = np.random.default_rng(2).integers(3, hf.config.vocab_size, (1, 6))
    with torch.no_grad():
        ref = hf.generate(torch.tensor(prompt), max_new_tokens=24, do_sample=False, eos_token_id=None,
                          pad_token_id=0, attention_mask=torch.ones_like(torch.tensor(prompt)))[0, 6:].tolist()
    decoder = Decoder(lm.config.model, lm.graphdef, SamplingConfig(temperature=0.0, max_new_tokens=24))
    ours = decoder.generate(lm.params, prompt.tolist(), pad_id=0, eos_id=None)[0]
    assert ours == ref
    # and the cache agrees with the uncached forward over the whole sequence, past the sliding window
    full = np.concatenate([prompt[0], ours])[None]
    np.testing.assert_array_equal(lm.logits(full)[0, 5:-1].argmax(-1), ours)


def test_export_reloads_in_transformers_bit_for_bit(converted):
    family, hf, tmp = converted
    arch = FAMILIES[family][0] if family in ("qwen3", "gemma2") else family  # the class name or the short name
    export_hf(tmp / "run", tmp / "exported", arch)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp / "exported")
    assert type(again).__name__ == FAMILIES[family][0]
    want, got = hf.state_dict(), again.state_dict()
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert torch.equal(got[name], value), name
    ids = torch.tensor(np.random.default_rng(3).integers(0, hf.config.vocab_size, (1, 10)))
    again.config._attn_implementation = "eager"
    with torch.no_grad():
        np.testing.assert_array_equal(again.eval()(ids).logits.numpy(), hf(ids).logits.numpy())


def test_bfloat16_checkpoint_imports(converted, tmp_path):
    family, hf, _ = converted
    half = make_hf(family).to(torch.bfloat16)
    half.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "run")
    lm = qkv.load(tmp_path / "run")
    ids = np.random.default_rng(4).integers(3, hf.config.vocab_size, (1, 8))
    with torch.no_grad():
        ref = half.float()(torch.tensor(ids)).logits.numpy()  # the same bfloat16 weights, computed in float32
    assert np.abs(lm.logits(ids) - ref).max() <= 1e-4
