"""The Hugging Face family presets (configs/qwen*.yaml, mistral-7b, gemma*, olmo2-1b) are the released shapes:
their parameter counts equal what transformers builds for the published config.json of each model (built on the
meta device, so nothing is allocated), and their options are the family's (the converter's config mapping of the
same config.json gives the preset's model)."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from qkv.model import abstract_model, count_params, split_params  # noqa: E402
from qkv.train.config import load_config  # noqa: E402

GEMMA3_1B_TYPES = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(26)]

# name: (transformers class, config class, the released config.json's shape fields)
RELEASED = {
    "qwen2.5-0.5b": ("Qwen2ForCausalLM", "Qwen2Config", dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "qwen2.5-7b": ("Qwen2ForCausalLM", "Qwen2Config", dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, max_position_embeddings=131072, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "qwen3-0.6b": ("Qwen3ForCausalLM", "Qwen3Config", dict(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6,
        tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "qwen3-8b": ("Qwen3ForCausalLM", "Qwen3Config", dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6,
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "mistral-7b": ("MistralForCausalLM", "MistralConfig", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=32768, rms_norm_eps=1e-5, sliding_window=4096,
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "gemma2-2b": ("Gemma2ForCausalLM", "Gemma2Config", dict(
        vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
        num_key_value_heads=4, head_dim=256, max_position_embeddings=8192, rms_norm_eps=1e-6,
        query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
        tie_word_embeddings=True)),
    "gemma3-1b": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(
        vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, max_position_embeddings=32768, rms_norm_eps=1e-6,
        query_pre_attn_scalar=256, sliding_window=512, layer_types=GEMMA3_1B_TYPES, tie_word_embeddings=True,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})),
    "olmo2-1b": ("Olmo2ForCausalLM", "Olmo2Config", dict(
        vocab_size=100352, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=16,
        num_key_value_heads=16, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
}


def hf_config(name):
    cls, config_cls, fields = RELEASED[name]
    return cls, getattr(transformers, config_cls)(**fields)


@pytest.mark.parametrize("name", list(RELEASED))
def test_preset_parameter_count_equals_transformers(name):
    cls, config = hf_config(name)
    with torch.device("meta"):
        model = getattr(transformers, cls)(config)
    expected = sum(p.numel() for p in model.parameters())  # tied weights are one parameter
    cfg = load_config(name).model
    assert count_params(split_params(abstract_model(cfg))[1]) == expected, name


@pytest.mark.parametrize("name", list(RELEASED))
def test_plan_for_an_h100_runs_for_each_family_preset(name):
    """`qkv plan PRESET --device h100`'s exact state bytes and its attention line (no compile here)."""
    from qkv.tools.plan import build_plan, format_plan

    plan = build_plan(load_config(name, ["train.batch_size=1"]), {"data": 1, "fsdp": 1, "tensor": 1}, compile=False)
    text = format_plan(plan, "h100")
    assert plan["model_parameters"] == count_params(split_params(abstract_model(load_config(name).model))[1])
    assert "H100" in text and "attention " in text


@pytest.mark.slow  # compiles the 26-layer train step for TPU (minutes on 2 cores)
def test_gemma2_2b_compiles_for_tpu_v5p_with_splash():
    """`qkv plan gemma2-2b --topology v5p:2x2x1`: sliding windows and the attention soft-cap run on splash."""
    from qkv.tools.topology_plan import format_topology_plan, topology_plan

    cfg = load_config("gemma2-2b", ["train.batch_size=8", "data.seq_len=1024"])
    plan = topology_plan(cfg, "v5p:2x2x1", {"data": 1, "fsdp": 4, "tensor": 1}, with_estimate=False)
    assert plan["attention"] == "splash" and plan["fits"], plan
    assert "attention splash," in format_topology_plan(plan)


@pytest.mark.slow  # three small TPU compiles
def test_the_step_time_estimate_takes_per_layer_types():
    """The estimate compiles 1- and 2-layer variants of the model: its layer_types are cut to match."""
    from qkv.tools.topology_plan import topology_plan

    cfg = load_config("gemma2-2b", ["model.n_layers=4", "model.layer_types=[sliding,full,sliding,full]",
                                    "model.vocab_size=1024", "model.d_model=256", "model.n_heads=2",
                                    "model.n_kv_heads=2", "model.head_dim=128", "model.d_ff=512",
                                    "model.sliding_window=128", "train.batch_size=4", "data.seq_len=512"])
    plan = topology_plan(cfg, "v5p:2x2x1", {"data": 1, "fsdp": 4, "tensor": 1})
    assert "step_seconds" in plan["estimate"], plan["estimate"]
