"""A list of EOS ids (generation_config.json's eos_token_id, as Llama 3 and Qwen ship it): imported, generation stops
at any of them exactly where transformers' does, and export writes the list back."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import qkv  # noqa: E402
from qkv.inference.decode import eos_ids, trim_at_eos  # noqa: E402
from qkv.tools.convert import export_hf, import_hf  # noqa: E402


def test_eos_ids_and_trim():
    assert eos_ids(None) == () and eos_ids(5) == (5,) and eos_ids([7, np.int64(3)]) == (7, 3)
    assert trim_at_eos([4, 9, 3, 7, 1], [7, 3]) == [4, 9] and trim_at_eos([4, 9], [7]) == [4, 9]


def test_generation_stops_at_any_eos_id_of_generation_config(tmp_path):
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    hf = transformers.Qwen2ForCausalLM(config).eval()
    prompt = [5, 17, 33, 2]
    with torch.no_grad():  # the free-running greedy continuation picks the EOS ids: one it emits at step 6
        free = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                           pad_token_id=0, attention_mask=torch.ones(1, 4, dtype=torch.long))[0, 4:].tolist()
    second = free[6]
    first = next(i for i in range(3, 64) if i not in free)  # an id it never emits, listed first
    hf.generation_config.eos_token_id = [first, second]
    hf.save_pretrained(tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"] == [first, second]
    import_hf(tmp_path / "hf", tmp_path / "run")
    lm = qkv.load(tmp_path / "run")
    assert set(lm.stop_ids) == {first, second}
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=[first, second],
                          pad_token_id=0, attention_mask=torch.ones(1, 4, dtype=torch.long))[0, 4:].tolist()
    want = free[:free.index(second)]
    assert trim_at_eos(ref, [first, second]) == want
    assert lm.generate_ids([prompt], max_new_tokens=12, temperature=0.0) == [want]
    export_hf(tmp_path / "run", tmp_path / "out", "qwen2")
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["eos_token_id"] == [first, second]
