"""The family options of ModelConfig: defaults change nothing, the old boolean QK-norm spelling still works, and
each bad value (or a combination qkv does not compute) is refused naming the key."""
from __future__ import annotations

import pytest

from qkv.errors import UserError
from qkv.model import ModelConfig
from qkv.train.config import load_config

BASE = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=48)


def test_defaults_and_the_boolean_qk_norm():
    cfg = ModelConfig(**BASE)
    assert (cfg.qkv_bias, cfg.qk_norm, cfg.norm_scale_offset, cfg.sandwich_norm, cfg.embed_scale) == \
        (False, "none", False, False, False)
    assert (cfg.query_scale, cfg.attn_softcap, cfg.sliding_window, cfg.layer_types, cfg.rope_local_theta) == \
        (0.0, 0.0, 0, (), 0.0)
    assert cfg.layer_is_sliding() == (False, False)
    assert ModelConfig(**BASE, qk_norm=True).qk_norm == "rms" and ModelConfig(**BASE, qk_norm=False).qk_norm == "none"
    assert load_config("tiny", ["model.qk_norm=true"]).model.qk_norm == "rms"
    assert load_config("tiny", ["model.qk_norm=head"]).model.qk_norm == "head"
    assert ModelConfig(**BASE, sliding_window=8).layer_is_sliding() == (True, True)  # Mistral: every layer
    assert ModelConfig(**BASE, sliding_window=8, layer_types=["full", "sliding"]).layer_is_sliding() == (False, True)


@pytest.mark.parametrize("change, key", [
    (dict(qk_norm="learned"), "model.qk_norm"),
    (dict(activation="reglu"), "model.activation"),
    (dict(norm_position="middle"), "model.norm_position"),
    (dict(sliding_window=-1), "model.sliding_window"),
    (dict(attn_softcap=-2.0), "model.attn_softcap"),
    (dict(query_scale=-0.1), "model.query_scale"),
    (dict(rope_local_theta=-1.0), "model.rope_local_theta"),
    (dict(layer_types=("full", "local")), "model.layer_types"),
    (dict(layer_types=("full",)), "model.layer_types"),  # one per layer
    (dict(layer_types=("full", "sliding")), "model.sliding_window"),  # sliding layers need a window
    (dict(norm_scale_offset=True, norm="layernorm"), "model.norm_scale_offset"),
    (dict(norm_position="output", sandwich_norm=True), "model.sandwich_norm"),
    (dict(kind="encoder", sliding_window=4), "model.sliding_window"),
    (dict(kind="encoder_decoder", attn_softcap=5.0), "model.attn_softcap"),
    (dict(kind="encoder", norm_position="output"), "model.norm_position"),
])
def test_bad_values_are_refused_by_key(change, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        ModelConfig(**{**BASE, **change})
