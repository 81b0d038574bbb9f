"""`qkv explain`'s attention weights (the reference path, sown per layer) equal transformers' eager attention
probabilities for Gemma 2 and Gemma 3: sliding windows on some layers, the attention soft-cap, the query scale and
Gemma 3's local RoPE base all reach the weights it shows; and the FLOP count sees the window."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import qkv  # noqa: E402
from qkv.inference.explain import forward_with_weights  # noqa: E402
from qkv.model import ModelConfig  # noqa: E402
from qkv.tools.convert import import_hf  # noqa: E402
from qkv.train.metrics import flops_per_token  # noqa: E402

GEMMA = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=64, query_pre_attn_scalar=24,
             sliding_window=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(GEMMA, attn_logit_softcapping=1.5,
                                                          final_logit_softcapping=3.0)),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(
        GEMMA, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}})),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_explain_weights_equal_transformers_attention(family, tmp_path):
    cls, config_cls, fields = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**fields)
    config._attn_implementation = "eager"
    hf = getattr(transformers, cls)(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim == 1:
                p.copy_(0.3 * torch.randn_like(p))
            else:  # larger weights, so the soft-cap and the window change the probabilities visibly
                p.mul_(4.0)
    hf.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "run")
    lm = qkv.load(tmp_path / "run")
    ids = np.random.default_rng(5).integers(3, 64, (1, 10)).astype(np.int32)
    batch = {"inputs": ids, "positions": None, "segment_ids": np.ones_like(ids)}
    logits, weights = forward_with_weights(lm.graphdef, lm.params, batch)
    with torch.no_grad():
        out = hf(torch.tensor(ids, dtype=torch.long), output_attentions=True)
    ref = np.stack([a.numpy() for a in out.attentions])  # [L, B, H, T, S]
    assert weights["self"].shape == ref.shape
    np.testing.assert_allclose(weights["self"], ref, atol=1e-5)
    assert np.abs(logits - out.logits.numpy()).max() <= 1e-4
    sliding = [t == "sliding_attention" for t in config.layer_types]
    assert all((weights["self"][i][..., 9, :6] == 0).all() for i in range(3) if sliding[i])  # outside the window
    assert not any((weights["self"][i][..., 9, :6] == 0).all() for i in range(3) if not sliding[i])


def test_flops_per_token_counts_the_keys_a_sliding_window_sees():
    """Attention FLOPs per token: 12·H·E per key a query sees, averaged over positions (float64 count)."""
    base = dict(vocab_size=64, d_model=32, n_layers=3, n_heads=4, d_ff=48)
    t, w = 64, 8
    full = flops_per_token(ModelConfig(**base), t)
    windowed = flops_per_token(ModelConfig(**base, sliding_window=w, layer_types=("sliding", "full", "sliding")), t)
    keys_full = t / 2  # the count's causal convention: half the keys on average
    keys_sliding = np.mean([min(i + 1, w) for i in range(t)], dtype=np.float64)
    h_e = 4 * 8
    assert np.isclose(full - windowed, 12 * h_e * 2 * (keys_full - keys_sliding))
