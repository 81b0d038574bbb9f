"""Qwen 2's optional sliding windows: `use_sliding_window` with `max_window_layers` (no `layer_types` in config.json,
as older checkpoints ship) gives full layers first and windowed layers after, exactly as transformers computes."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import qkv  # noqa: E402
from qkv.tools.convert import import_hf  # noqa: E402


def test_qwen2_max_window_layers_imports_exactly(tmp_path):
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      use_sliding_window=True, sliding_window=4, max_window_layers=1)
    config._attn_implementation = "eager"
    hf = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(4.0)  # sharper attention, so the window changes the logits visibly
    hf.save_pretrained(tmp_path / "hf")
    fields = json.loads((tmp_path / "hf" / "config.json").read_text())
    fields.pop("layer_types")  # the older config.json: the layer kinds follow from max_window_layers
    (tmp_path / "hf" / "config.json").write_text(json.dumps(fields))
    import_hf(tmp_path / "hf", tmp_path / "run")
    lm = qkv.load(tmp_path / "run")
    assert lm.config.model.layer_is_sliding() == (False, True, True) and lm.config.model.sliding_window == 4
    ids = np.random.default_rng(0).integers(0, 64, (1, 16))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    assert np.abs(lm.logits(ids) - ref).max() <= 1e-4
    unwindowed = transformers.Qwen2Config(**{**config.to_dict(), "use_sliding_window": False, "layer_types": None})
    plain = transformers.Qwen2ForCausalLM(unwindowed).eval()
    plain.load_state_dict(hf.state_dict())
    with torch.no_grad():
        assert np.abs(plain(torch.tensor(ids), use_cache=False).logits.numpy() - ref).max() > 0.1  # the window matters
