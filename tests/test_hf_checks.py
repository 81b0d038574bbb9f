"""Hugging Face import: exact long-context RoPE, refusals by field name, damaged files, real special ids on
export, tokenizer.json checkpoints end to end through the CLI, and the tokenizer/vocabulary check."""
from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import qkv  # noqa: E402
from qkv.cli import main  # noqa: E402
from qkv.data import Tokenizer  # noqa: E402
from qkv.tools.convert import export_hf, import_hf  # noqa: E402

from test_hf import make_hf  # noqa: E402
from test_tokenizer import ROUND_TRIP_CASES  # noqa: E402

pytestmark = pytest.mark.slow  # trains, compiles or runs processes: deselect with -m 'not slow'

LLAMA = dict(vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
GPT2 = dict(vocab_size=300, n_embd=32, n_layer=2, n_head=4, n_positions=64)


def run_cli(capsys, *args: str) -> tuple[int, str, list[str]]:
    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err.strip().splitlines()


def max_logit_diff(hf_model, run_dir, length: int = 48) -> float:
    lm = qkv.load(run_dir)
    ids = np.random.default_rng(1).integers(0, hf_model.config.vocab_size, (2, length))
    with torch.no_grad():
        ref = hf_model(torch.tensor(ids)).logits.numpy()
    return float(np.abs(lm.logits(ids) - ref).max())


# --- RoPE scaling: exact, whichever way config.json spells it ----------------------------------------------

ROPE = {
    "linear-rope_parameters": dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 1000.0}),
    "llama3": dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
                                    "rope_theta": 500000.0}),
}


@pytest.mark.parametrize("name", list(ROPE))
def test_rope_scaling_matches_transformers(name, tmp_path):
    hf = make_hf("llama", {**LLAMA, **ROPE[name]})
    with torch.no_grad():  # sharper attention, so that positions matter to the logits
        for layer in hf.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    hf.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "run")
    cfg = qkv.load(tmp_path / "run").config.model
    assert cfg.rope_scaling == name.split("-")[0]
    ours = max_logit_diff(hf, tmp_path / "run")
    assert ours <= 1e-4
    # the scaling matters at these positions: plain RoPE would be far off
    plain = make_hf("llama", {**LLAMA, "rope_parameters": {"rope_type": "default",
                                                           "rope_theta": ROPE[name]["rope_parameters"]["rope_theta"]}})
    plain.load_state_dict(hf.state_dict())
    assert max_logit_diff(plain, tmp_path / "run") > max(1e-2, 1000 * ours)
    # export writes rope_parameters back; transformers reproduces the same logits
    export_hf(tmp_path / "run", tmp_path / "out", "llama")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert max_logit_diff(again, tmp_path / "run") <= 1e-4


def test_old_rope_scaling_key_is_read(tmp_path):
    """transformers 4 wrote rope_theta + rope_scaling {"type": ...}; the case that would otherwise import silently wrong."""
    hf = make_hf("llama", {**LLAMA, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}})
    hf.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    del config["rope_parameters"]
    config.update(rope_theta=1e4, rope_scaling={"type": "linear", "factor": 2.0})
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    import_hf(tmp_path / "hf", tmp_path / "run")
    assert max_logit_diff(hf, tmp_path / "run") <= 1e-4


# --- fields qkv does not compute: refused by name, exit 2, nothing written --------------------------------

REFUSED = {
    "scale_attn_by_inverse_layer_idx": ("gpt2", {"scale_attn_by_inverse_layer_idx": True}),
    "scale_attn_weights": ("gpt2", {"scale_attn_weights": False}),
    "activation_function": ("gpt2", {"activation_function": "relu"}),
    "hidden_act": ("llama", {"hidden_act": "gelu"}),
    "attention_bias": ("llama", {"attention_bias": True}),
    "mlp_bias": ("llama", {"mlp_bias": True}),
    "rope_type='dynamic'": ("llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}),
    "rope_type='yarn'": ("llama", {"rope_scaling": {"type": "yarn", "factor": 2.0}}),
    "partial_rotary_factor": ("llama", {"partial_rotary_factor": 0.5}),
    "sliding_window": ("llama", {"sliding_window": 16}),
    "quantization_config": ("llama", {"quantization_config": {"quant_method": "bitsandbytes"}}),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    for kind, kwargs in (("llama", LLAMA), ("gpt2", GPT2)):
        make_hf(kind, kwargs).save_pretrained(root / kind)
    return root


def _copy_with(saved, tmp_path, kind: str, changes: dict) -> str:
    target = tmp_path / "hf"
    target.mkdir()
    for f in (saved / kind).iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    config = json.loads((target / "config.json").read_text())
    config.update(changes)
    (target / "config.json").write_text(json.dumps(config))
    return str(target)


@pytest.mark.parametrize("field", list(REFUSED))
def test_math_changing_fields_are_refused_by_name(field, saved, tmp_path, capsys):
    kind, changes = REFUSED[field]
    hf_dir = _copy_with(saved, tmp_path, kind, changes)
    code, _, err = run_cli(capsys, "convert", "import", hf_dir, str(tmp_path / "run"))
    assert code == 2 and len(err) == 1 and err[0].startswith("qkv: error: config.json"), err
    assert field in err[0]
    assert not (tmp_path / "run").exists()


def test_inert_fields_are_accepted(saved, tmp_path):
    hf_dir = _copy_with(saved, tmp_path, "gpt2", {"n_ctx": 64, "reorder_and_upcast_attn": True, "attn_pdrop": 0.3,
                                                  "_name_or_path": "x", "task_specific_params": {}})
    import_hf(hf_dir, tmp_path / "run")


def test_untied_gpt2_converts_both_ways(tmp_path):
    hf = make_hf("gpt2", {**GPT2, "tie_word_embeddings": False})
    hf.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "run")
    assert max_logit_diff(hf, tmp_path / "run", 16) <= 1e-4
    export_hf(tmp_path / "run", tmp_path / "out", "gpt2")
    assert max_logit_diff(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out"), tmp_path / "run",
                          16) <= 1e-4


# --- damaged inputs: one line naming the file, exit 2 -----------------------------------------------------

def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _bad_header(path):
    path.write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{not json" + b" " * 80)


def _short_file(path):
    path.write_bytes(b"\x01\x02")


@pytest.mark.parametrize("damage", [_truncate, _bad_header, _short_file])
def test_damaged_safetensors_is_one_line(damage, saved, tmp_path, capsys):
    hf_dir = _copy_with(saved, tmp_path, "llama", {})
    damage(tmp_path / "hf" / "model.safetensors")
    code, _, err = run_cli(capsys, "convert", "import", hf_dir, str(tmp_path / "run"))
    assert code == 2 and len(err) == 1 and "model.safetensors" in err[0], err
    assert not (tmp_path / "run").exists()


def test_broken_config_json_is_one_line(saved, tmp_path, capsys):
    hf_dir = _copy_with(saved, tmp_path, "llama", {})
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "llama", ')
    code, _, err = run_cli(capsys, "convert", "import", hf_dir, str(tmp_path / "run"))
    assert code == 2 and len(err) == 1 and "config.json is not valid JSON" in err[0], err
    config = json.loads((saved / "llama" / "config.json").read_text())
    del config["hidden_size"]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, "convert", "import", hf_dir, str(tmp_path / "run"))
    assert code == 2 and "lacks field 'hidden_size'" in err[0], err


def test_sharded_bf16_checkpoint_streams(tmp_path):
    hf = make_hf("llama", LLAMA).to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 2
    import_hf(tmp_path / "hf", tmp_path / "run")
    with torch.no_grad():
        ids = torch.tensor([[5, 9, 200, 3]])
        ref = hf.float()(ids).logits.numpy()
    assert np.abs(qkv.load(tmp_path / "run").logits(ids.numpy()) - ref).max() <= 1e-4
    summary = export_hf(tmp_path / "run", tmp_path / "out", "llama", shard_bytes=40_000)
    assert summary["files"] > 2 and (tmp_path / "out" / "model.safetensors.index.json").is_file()
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():  # (ref's RoPE table went through bfloat16 with the model: not bit-equal)
        assert np.abs(again(ids).logits.numpy() - ref).max() <= 1e-4


# --- tokenizer.json checkpoints ---------------------------------------------------------------------------

def byte_bpe(specials: list[str], vocab_size: int = 300) -> tokenizers.Tokenizer:
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(ROUND_TRIP_CASES.values()) * 5 + ["def forward(self, x):\n    return x\n"] * 20,
                            trainer)
    return tok


def gpt2_style(root):
    """GPT-2's layout: one special token <|endoftext|>, bos = eos, ids in config.json."""
    tok = byte_bpe(["<|endoftext|>"])
    eos = tok.token_to_id("<|endoftext|>")
    hf = make_hf("gpt2", {**GPT2, "vocab_size": tok.get_vocab_size(), "bos_token_id": eos, "eos_token_id": eos})
    hf.save_pretrained(root)
    tok.save(str(root / "tokenizer.json"))
    return hf, eos


def llama3_style(root):
    """Llama 3's layout: <|begin_of_text|>/<|end_of_text|> named in tokenizer_config.json, a padded vocabulary."""
    tok = byte_bpe(["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"])
    hf = make_hf("llama", {**LLAMA, "vocab_size": tok.get_vocab_size() + 13, "bos_token_id": 0,
                           "eos_token_id": [1, 2]})
    hf.save_pretrained(root)
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>",
                                                            "eos_token": "<|end_of_text|>"}))
    return hf, 1


def test_hf_tokenizer_round_trip_and_bytes(tmp_path):
    byte_bpe(["<|endoftext|>"]).save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.load(tmp_path / "tokenizer.json")
    assert tok.backend == "hf" and tok.bos_id == tok.eos_id == tok.pad_id == 0 and tok.unk_id is None
    for text in list(ROUND_TRIP_CASES.values()) + ["a<|endoftext|>b", "\U0001f9ec ᚠᛇᚻ"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text and tok.eos_id not in ids
    again = Tokenizer.from_bytes(tok.to_bytes())
    text = ROUND_TRIP_CASES["python"]
    assert again.encode(text) == tok.encode(text) and again.to_bytes() == tok.to_bytes()
    assert tok.decode([tok.bos_id] + tok.encode("hi") + [tok.eos_id]) == "hi"
    assert tok.encode_batch(["x", "y z"]) == [tok.encode("x"), tok.encode("y z")]
    lengths = tok.byte_lengths()  # bits per byte divide by these: summed over a text's ids, its UTF-8 length
    assert lengths.shape == (tok.vocab_size,) and lengths[tok.eos_id] == 0
    for text in list(ROUND_TRIP_CASES.values()) + ["\U0001f9ec ᚠᛇᚻ"]:
        assert int(lengths[tok.encode(text)].sum()) == len(text.encode("utf-8")), text[:40]


@pytest.mark.parametrize("style", [gpt2_style, llama3_style])
def test_generate_from_an_imported_tokenizer_json_directory(style, tmp_path, capsys):
    hf, eos = style(tmp_path / "hf")
    code, out, err = run_cli(capsys, "convert", "import", str(tmp_path / "hf"), str(tmp_path / "run"))
    assert code == 0 and json.loads(out)["tokenizer"] == "hf", err
    lm = qkv.load(tmp_path / "run")
    assert lm.tokenizer.eos_id == eos and lm.tokenizer.bos_id == hf.config.bos_token_id
    # text in, text out
    code, out, err = run_cli(capsys, "generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "def f(x):",
                             "--max-new-tokens", "6", "--temperature", "0", "--no-stream")
    assert code == 0 and out.startswith("def f(x):"), err
    batch = lm.generate(["def f(x):"], max_new_tokens=6, temperature=0.0)[0]
    code, streamed, err = run_cli(capsys, "generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "def f(x):",
                                  "--max-new-tokens", "6", "--temperature", "0")  # streamed piece by piece
    assert code == 0 and streamed == f"def f(x):{batch}\n" and out.startswith(f"def f(x):{batch}\n"), err
    # ids in, ids out: the same greedy tokens as transformers
    prompt = [hf.config.bos_token_id] + lm.tokenizer.encode("return x")
    code, out, err = run_cli(capsys, "generate", "--checkpoint", str(tmp_path / "run"), "--prompt-ids",
                             ",".join(map(str, prompt)), "--max-new-tokens", "6", "--temperature", "0")
    assert code == 0, err
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=eos,
                          pad_token_id=eos, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    want = ref[0, len(prompt):].tolist()
    want = want[:want.index(eos)] if eos in want else want
    assert out.strip() == ",".join(map(str, want))
    assert lm.generate_ids([prompt], max_new_tokens=6, temperature=0.0) == [want]
    for bad, words in (("1,x", "comma-separated integer"), (f"1,{hf.config.vocab_size}", "outside the model's")):
        code, _, err = run_cli(capsys, "generate", "--checkpoint", str(tmp_path / "run"), "--prompt-ids", bad)
        assert code == 2 and len(err) == 1 and words in err[0], err


def test_export_writes_real_special_ids_and_the_tokenizer(tmp_path):
    hf, eos = gpt2_style(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "run")
    os.umask(old := os.umask(0o022))
    export_hf(tmp_path / "run", tmp_path / "out", "gpt2")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert config["eos_token_id"] == generation["eos_token_id"] == eos
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~old
    fast = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert fast.eos_token_id == eos and fast.encode("def f(x):") == Tokenizer.load(tmp_path / "hf").encode("def f(x):")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert again.generation_config.eos_token_id == eos


def test_export_without_tokenizer_keeps_imported_ids(tmp_path):
    hf = make_hf("gpt2", {**GPT2, "bos_token_id": 7, "eos_token_id": 299})
    hf.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "run")
    export_hf(tmp_path / "run", tmp_path / "out", "gpt2")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (7, 299) and "pad_token_id" not in config


def test_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path, capsys):
    tok = byte_bpe(["<|endoftext|>"])
    make_hf("gpt2", {**GPT2, "vocab_size": tok.get_vocab_size() - 10}).save_pretrained(tmp_path / "hf")
    tok.save(str(tmp_path / "tok.json"))
    code, _, err = run_cli(capsys, "convert", "import", str(tmp_path / "hf"), str(tmp_path / "run"),
                           "--tokenizer", str(tmp_path / "tok.json"))
    assert code == 2 and len(err) == 1 and f"has {tok.get_vocab_size()} tokens" in err[0] \
        and f"only {tok.get_vocab_size() - 10} rows" in err[0], err
    assert not (tmp_path / "run").exists()
    # and at load, for a checkpoint written before the check existed (or edited by hand)
    import_hf(tmp_path / "hf", tmp_path / "run")
    from qkv.train import checkpoint
    meta_path = next((tmp_path / "run").rglob("meta/metadata"))
    meta = json.loads(meta_path.read_text())
    meta["tokenizer"] = checkpoint.encode_tokenizer(Tokenizer.load(tmp_path / "tok.json").to_bytes())
    meta_path.write_text(json.dumps(meta))
    code, _, err = run_cli(capsys, "generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "x")
    assert code == 2 and "model.vocab_size" in err[0], err


def test_lora_finetune_of_an_imported_checkpoint_exports_to_transformers(tmp_path, capsys):
    """HF Llama-3-style directory -> qkv convert import -> qkv finetune (LoRA SFT) -> merge-lora -> export ->
    transformers: the same logits as the LoRA run, and not those of the base."""
    hf, _ = llama3_style(tmp_path / "hf")
    assert run_cli(capsys, "convert", "import", str(tmp_path / "hf"), str(tmp_path / "base"))[0] == 0
    records = [{"prompt": f"def f{i}(x):", "response": f"    return x + {i}\n"} for i in range(24)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    code, out, err = run_cli(capsys, "finetune", "lora-tiny", f"finetune.init_from={tmp_path / 'base'}",
                             f"finetune.train_path={tmp_path / 'sft.jsonl'}", f"train.run_dir={tmp_path / 'lora'}",
                             "finetune.lora.rank=4", "train.steps=4", "train.batch_size=8", "data.seq_len=32",
                             "optim.learning_rate=1e-2", "optim.warmup_steps=1", "train.eval_every=100",
                             "train.checkpoint_every=100", "train.sample_tokens=4")
    assert code == 0, err[-5:]
    assert run_cli(capsys, "convert", "merge-lora", str(tmp_path / "lora"), str(tmp_path / "merged"))[0] == 0
    code, out, err = run_cli(capsys, "convert", "export", str(tmp_path / "merged"), str(tmp_path / "out"),
                             "--arch", "llama")
    assert code == 0, err
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tuned = max_logit_diff(exported, tmp_path / "lora", 24)
    assert tuned <= 1e-4
    assert max_logit_diff(hf, tmp_path / "lora", 24) > 100 * max(tuned, 1e-6)  # the adapters changed the model
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["eos_token_id"] == [1, 2]  # the list goes back out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("change", [dict(qk_norm=True), dict(logit_softcap=30.0)])
def test_export_refuses_math_the_hf_architecture_lacks(arch, change):
    """QK-norm and the logit soft-cap have no field in HF's Llama or GPT-2 configs: exporting them would be silently
    wrong, so the architecture's check names the key."""
    from qkv.model import ModelConfig
    from qkv.model.hf import ARCHITECTURES
    base = dict(vocab_size=320, d_model=32, n_heads=4, d_ff=48, n_layers=2)
    if arch == "gpt2":
        base |= dict(positions="learned", norm="layernorm", activation="gelu", use_bias=True)
    ARCHITECTURES[arch].check(ModelConfig(**base))  # the plain shape exports
    key = next(iter(change))
    with pytest.raises(ValueError, match=f"model.{key}="):
        ARCHITECTURES[arch].check(ModelConfig(**base, **change))
