"""The mixture-of-experts Hugging Face families (Mixtral, Qwen 3 MoE, OLMoE) against tiny random transformers
models (float32, eager attention): logits to 1e-4 over a padded batch, greedy decoding with the cache identical,
export -> transformers bit for bit; fields that change the math refused by name."""
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

BASE = dict(vocab_size=97, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=False,
            num_experts_per_tok=2, rope_theta=1000.0)
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(BASE, num_local_experts=4)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(BASE, num_experts=4, moe_intermediate_size=16, norm_topk_prob=True)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(BASE, num_experts=4, num_key_value_heads=4)),
}


def make_hf(family: str, seed: int = 0, **changes):
    config_cls, model_cls, kwargs = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**kwargs, **changes})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():  # random norms, and a router spread enough that top-k is never a near tie
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("gate.weight") and p.ndim == 2:
                p.copy_(torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module", params=list(FAMILIES))
def converted(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    hf = make_hf(request.param)
    hf.save_pretrained(tmp / "hf")
    import_hf(tmp / "hf", tmp / "run")
    return request.param, hf, tmp


def test_logits_match_transformers_over_a_padded_batch(converted):
    family, hf, tmp = converted
    lm = qkv.load(tmp / "run")
    assert lm.config.model.n_experts == 4
    ids = np.random.default_rng(1).integers(0, 97, (2, 14))
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    with torch.no_grad():
        ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    ours = lm.logits(ids)
    assert np.abs(ours[0] - ref[0]).max() <= 1e-4
    assert np.abs(ours[1, :9] - ref[1, :9]).max() <= 1e-4


def test_greedy_decoding_with_the_cache_matches_transformers(converted):
    family, hf, tmp = converted
    lm = qkv.load(tmp / "run")
    prompt = np.random.default_rng(2).integers(3, 97, (1, 5))
    with torch.no_grad():
        ref = hf.generate(torch.tensor(prompt), max_new_tokens=16, do_sample=False, eos_token_id=None,
                          pad_token_id=0, attention_mask=torch.ones_like(torch.tensor(prompt)))
    decoder = Decoder(lm.config.model, lm.graphdef, SamplingConfig(temperature=0.0, max_new_tokens=16))
    assert decoder.generate(lm.params, prompt.tolist(), pad_id=0, eos_id=None)[0] == ref[0, 5:].tolist()


def test_export_reloads_bit_for_bit(converted):
    family, hf, tmp = converted
    export_hf(tmp / "run", tmp / "exported", FAMILIES[family][1])
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp / "exported", attn_implementation="eager").eval()
    want = hf.state_dict()
    assert sorted(again.state_dict()) == sorted(want)
    for name, tensor in again.state_dict().items():
        np.testing.assert_array_equal(tensor.numpy(), want[name].numpy(), err_msg=name)
    import_hf(tmp / "exported", tmp / "reimported")
    _, first, _ = load_params(tmp / "run")
    _, second, _ = load_params(tmp / "reimported")
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("family, field, value, message", [
    ("mixtral", "router_jitter_noise", 0.1, "router_jitter_noise"),
    ("qwen3_moe", "decoder_sparse_step", 2, "decoder_sparse_step"),
    ("qwen3_moe", "mlp_only_layers", [0], "mlp_only_layers"),
    ("olmoe", "clip_qkv", 8.0, "clip_qkv"),
    ("olmoe", "shared_expert_intermediate_size", 64, "shared_expert_intermediate_size"),
])
def test_fields_that_change_the_math_are_refused_by_name(tmp_path, family, field, value, message):
    make_hf(family).save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config[field] = value
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        import_hf(tmp_path / "hf", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_export_refuses_what_the_family_cannot_hold(tmp_path):
    from qkv.errors import UserError
    from qkv.model import ModelConfig
    from qkv.model.hf import find_architecture
    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, d_ff=24, n_experts=4,
                      expert_capacity_factor=1.25)
    with pytest.raises(UserError, match="expert_capacity_factor"):
        find_architecture("mixtral").check(cfg)
    with pytest.raises(UserError, match="model.router"):
        find_architecture("qwen3_moe").check(cfg.replace(expert_capacity_factor=0.0, router="sigmoid_normalized",
                                                         moe_d_ff=16, qk_norm="head"))
