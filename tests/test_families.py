"""The Hugging Face families beyond Llama and GPT-2, each against a tiny random transformers model.

For every family: qkv's logits equal transformers' (eager attention, float32) over a padded batch,
greedy decoding with the KV cache gives transformers' tokens (past the sliding window where the family
has one), export → transformers reproduces every tensor bit for bit (and re-import the parameters), and
a bfloat16 checkpoint imports. Then the refusals: fields that change the math and are not implemented.
"""
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

BASE = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=False)
FAMILIES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(BASE, rope_theta=1000.0)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(BASE, rope_theta=1000.0)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(BASE, sliding_window=6)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(BASE, rms_norm_eps=1e-6)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(BASE, num_hidden_layers=3, sliding_window=6, query_pre_attn_scalar=12, attn_logit_softcapping=2.0,
                    final_logit_softcapping=5.0, tie_word_embeddings=True)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(BASE, num_hidden_layers=3, sliding_window=6, query_pre_attn_scalar=8,
                    layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                    rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e5},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})),
}


def make_hf(family: str, seed: int = 0, **changes):
    config_cls, model_cls, kwargs = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**kwargs, **changes})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():  # random, non-trivial norms and biases so every tensor matters
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_((0.0 if "gemma" in family else 1.0) + 0.2 * torch.randn_like(p) if "weight" in name
                        else 0.2 * torch.randn_like(p))
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
    ids = np.random.default_rng(1).integers(0, 97, (2, 14))
    mask = np.ones_like(ids)
    mask[1, 9:] = 0  # the second row is 9 tokens and padding
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
        ref = hf.generate(torch.tensor(prompt), max_new_tokens=24, do_sample=False, eos_token_id=None,
                          pad_token_id=0, attention_mask=torch.ones_like(torch.tensor(prompt)))
    decoder = Decoder(lm.config.model, lm.graphdef, SamplingConfig(temperature=0.0, max_new_tokens=24))
    ours = decoder.generate(lm.params, prompt.tolist(), pad_id=0, eos_id=None)[0]
    assert ours == ref[0, 5:].tolist()  # 29 tokens: past the window of 6 where the family has one


def test_export_reloads_bit_for_bit_by_family_and_class_name(converted):
    family, hf, tmp = converted
    arch = family if family != "gemma3" else "Gemma3ForCausalLM"
    export_hf(tmp / "run", tmp / "exported", arch)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp / "exported", attn_implementation="eager").eval()
    want = hf.state_dict()
    for name, tensor in again.state_dict().items():
        np.testing.assert_array_equal(tensor.numpy(), want[name].numpy(), err_msg=name)
    ids = torch.tensor(np.random.default_rng(3).integers(0, 97, (1, 10)))
    with torch.no_grad():
        np.testing.assert_array_equal(again(ids).logits.numpy(), hf(ids).logits.numpy())
    import_hf(tmp / "exported", tmp / "reimported")
    _, first, _ = load_params(tmp / "run")
    _, second, _ = load_params(tmp / "reimported")
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_bfloat16_checkpoint_imports(converted, tmp_path):
    family, hf, _ = converted
    bf16 = make_hf(family).to(torch.bfloat16)
    bf16.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "run")
    _, params, _ = load_params(tmp_path / "run")
    embed = bf16.state_dict()["model.embed_tokens.weight"].float().numpy()
    np.testing.assert_array_equal(params["embed"], embed)


@pytest.mark.parametrize("family, field, value, message", [
    ("qwen3", "num_experts", 8, "num_experts"),
    ("qwen2", "partial_rotary_factor", 0.5, "partial_rotary_factor"),
    ("gemma2", "layer_types", ["chunked_attention"] * 3, "chunked_attention"),
    ("mistral", "hidden_act", "gelu", "hidden_act"),
    ("olmo2", "attention_bias", True, "attention_bias"),
])
def test_fields_that_change_the_math_are_refused_by_name(tmp_path, family, field, value, message):
    make_hf(family).save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config[field] = value
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        import_hf(tmp_path / "hf", tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3", "gemma2"])
def test_sft_of_an_imported_model_exports_with_nothing_dropped(family, tmp_path, capsys):
    """HF directory -> qkv convert import -> qkv finetune (SFT) -> export -> transformers: the same logits as the
    fine-tuned run (every feature survives the way out), and not those of the base."""
    from qkv.cli import main
    from test_hf_checks import byte_bpe

    tok = byte_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    hf = make_hf(family, vocab_size=tok.get_vocab_size() + 7, bos_token_id=0, eos_token_id=0)
    hf.save_pretrained(tmp_path / "hf")
    tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    assert main(["convert", "import", str(tmp_path / "hf"), str(tmp_path / "base")]) == 0
    records = [{"prompt": f"def f{i}(x):", "response": f"    return x + {i}\n"} for i in range(24)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    code = main(["finetune", "sft-tiny", f"finetune.init_from={tmp_path / 'base'}",
                 f"finetune.train_path={tmp_path / 'sft.jsonl'}", f"train.run_dir={tmp_path / 'sft'}",
                 "train.steps=3", "train.batch_size=8", "data.seq_len=32", "optim.learning_rate=1e-2",
                 "optim.warmup_steps=1", "train.eval_every=100", "train.checkpoint_every=100", "train.sample_tokens=4"])
    assert code == 0, capsys.readouterr().err[-2000:]
    assert main(["convert", "export", str(tmp_path / "sft"), str(tmp_path / "out"), "--arch", family]) == 0
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    lm = qkv.load(tmp_path / "sft")
    ids = np.random.default_rng(4).integers(0, hf.config.vocab_size, (2, 24))
    with torch.no_grad():
        tuned, base = exported(torch.tensor(ids)).logits.numpy(), hf(torch.tensor(ids)).logits.numpy()
    ours = lm.logits(ids)
    assert np.abs(ours - tuned).max() <= 1e-4
    assert np.abs(ours - base).max() > 100 * max(np.abs(ours - tuned).max(), 1e-6)  # SFT changed the model


def test_the_default_preset_exports_as_qwen3_and_llama_says_so():
    """qkv's scale-free per-head QK-norm (the tiny preset) is Qwen 3's with unit scales; Llama cannot hold it."""
    from qkv.model.hf import find_architecture
    from qkv.train.config import load_config

    cfg = load_config("tiny").model
    assert cfg.qk_norm == "rms"
    find_architecture("qwen3").check(cfg)
    find_architecture("Qwen3ForCausalLM").check(cfg)
    with pytest.raises(ValueError, match="qwen3 holds model.qk_norm=rms"):
        find_architecture("llama").check(cfg)


@pytest.mark.parametrize("kind, dropped", [("encoder", "bidirectional attention"),
                                           ("encoder_decoder", "encoder and cross-attention")])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen3"])
def test_export_refuses_a_model_kind_the_family_cannot_hold(kind, dropped, arch):
    from qkv.model import ModelConfig
    from qkv.model.hf import find_architecture

    base = dict(vocab_size=64, d_model=32, n_heads=4, d_ff=48, n_layers=2, use_bias=False, norm="rmsnorm",
                activation="swiglu", positions="rope")
    with pytest.raises(ValueError, match=f"model.kind={kind}.*{dropped}"):
        find_architecture(arch).check(ModelConfig(kind=kind, **base))
