"""Chat end to end: an imported instruct model (a tiny random Llama with a tokenizer and a chat template, built by
transformers) -> SFT on messages -> export -> transformers' generate with apply_chat_template gives qkv's reply;
`qkv chat` driven in a real terminal; the history kept within the context."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from qkv.cli import main as cli_main
from qkv.inference.chat import fit_history

FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"
SYSTEM = {"role": "system", "content": "Be brief."}
CHATS = [[SYSTEM, {"role": "user", "content": f"hello {w}"}, {"role": "assistant", "content": f"fine {w}"},
          {"role": "user", "content": "how are you"}, {"role": "assistant", "content": f"thanks {w}"}]
         for w in ("cat", "dog", "owl", "bee", "ant", "elk", "fox", "yak")]


def test_history_drops_the_oldest_turns_first():
    turns = [{"role": r, "content": str(i)} for i, r in enumerate(["user", "assistant"] * 3 + ["user"])]
    kept, dropped = fit_history(turns, len, 3)
    assert (kept, dropped) == (turns[-3:], 4) and kept[0]["role"] == "user"
    assert fit_history(turns, len, 100) == (turns, 0)
    assert fit_history(turns[-1:], len, 0) == (turns[-1:], 0)  # the newest user turn is always kept


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """HF instruct dir -> qkv convert import -> qkv finetune (SFT on messages) -> qkv convert export."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("chat")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [m["content"] for c in CHATS for m in c] * 10 + ["system user assistant"] * 10
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    source = (FIXTURES / "qwen2.5-instruct.jinja").read_text()
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                                  eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf_tok.chat_template = source
    im_end, eot = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(hf_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=eot, eos_token_id=im_end,
        pad_token_id=eot)).eval()
    model.save_pretrained(root / "hf")
    hf_tok.save_pretrained(root / "hf")
    gen = json.loads((root / "hf" / "generation_config.json").read_text())
    (root / "hf" / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [im_end, eot]}))
    assert cli_main(["convert", "import", str(root / "hf"), str(root / "base")]) == 0
    train = root / "chats.jsonl"
    train.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS))
    assert cli_main(["finetune", "sft-tiny", f"finetune.init_from={root / 'base'}", f"finetune.train_path={train}",
                     f"train.run_dir={root / 'sft'}", "data.seq_len=128", "train.batch_size=8", "train.steps=3",
                     "train.progress=false", "finetune.eval_fraction=0", "data.eval_batches=1",
                     "optim.warmup_steps=1", "optim.learning_rate=3e-2"]) == 0
    assert cli_main(["convert", "export", str(root / "sft"), str(root / "out"), "--arch", "llama"]) == 0
    return root


@pytest.mark.slow
def test_exported_model_chats_in_transformers_as_qkv_generate_messages(exported, capsys):
    import torch
    import transformers

    import qkv

    root = exported
    out = root / "out"
    assert (out / "chat_template.jinja").read_text() == (FIXTURES / "qwen2.5-instruct.jinja").read_text()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    lm = qkv.load(root / "sft")
    assert lm.meta["chat_template"] == hf_tok.chat_template
    im_end = hf_tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in lm.stop_ids and len(lm.stop_ids) == 2
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == lm.stop_ids
    conversations = [c[:2] for c in CHATS[:2]] + [CHATS[2][:4]]
    path = root / "ask.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    capsys.readouterr()
    assert cli_main(["generate", "--checkpoint", str(root / "sft"), "--messages", str(path), "--temperature", "0",
                     "--max-new-tokens", "12"]) == 0
    replies = [json.loads(line)["reply"] for line in capsys.readouterr().out.splitlines()]
    assert len(replies) == len(conversations)
    for messages, reply in zip(conversations, replies):
        ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
        assert lm.chat_prompt_ids(messages) == list(ids)  # the ids qkv trained on and answers from
        with torch.no_grad():
            new = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                              attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):].tolist()
        stops = set(lm.stop_ids)
        new = new[:next((i for i, t in enumerate(new) if t in stops), len(new))]
        skip = {lm.tokenizer.bos_id, lm.tokenizer.eos_id, lm.tokenizer.pad_id}
        assert reply == hf_tok.decode([t for t in new if t not in skip]), (reply, new)
    # SFT trained exactly the assistant turns: the run's examples decode to the replies and <|im_end|>.
    text = hf_tok.apply_chat_template(CHATS[0], tokenize=False)
    assert text.count("<|im_start|>assistant\n") == 2


@pytest.mark.slow
@pytest.mark.parametrize("fixture,record,message", [
    ("gemma-it.jinja", CHATS[1], "System role not supported"),
    ("chatml-generation.jinja", [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "ok"}],
     "Unknown role: robot")], ids=["raises", "role"])
def test_a_template_refusal_names_the_record_and_writes_nothing(exported, capsys, tmp_path, fixture, record, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": CHATS[0][1:3]}) + "\n" + json.dumps({"messages": record}) + "\n")
    run_dir = tmp_path / "never"
    capsys.readouterr()
    code = cli_main(["finetune", "sft-tiny", f"finetune.init_from={exported / 'base'}", f"finetune.train_path={bad}",
                     f"train.run_dir={run_dir}", "data.seq_len=128", "train.batch_size=8", "train.steps=1",
                     "train.progress=false", f"tokenizer.chat_template={FIXTURES / fixture}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not run_dir.exists()
    assert len(err) == 1 and err[0].startswith(f"qkv: error: {bad}:2: ") and "Traceback" not in err[0], err
    assert fixture in err[0] and message in err[0], err


def _greedy_hf(hf, ids, n, stops):
    import torch

    with torch.no_grad():
        new = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                          attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):].tolist()
    return new[:next((i for i, t in enumerate(new) if t in stops), len(new))]


@pytest.mark.slow
def test_template_kwargs_from_the_command_line_render_as_transformers(exported, capsys, tmp_path):
    """Qwen 3's enable_thinking=False through `qkv generate --messages --template-kwargs`: the prompt ids are
    apply_chat_template(..., enable_thinking=False)'s and the greedy reply transformers' generate's."""
    import shutil

    import transformers

    import qkv

    hf3 = tmp_path / "hf3"
    shutil.copytree(exported / "hf", hf3)
    source = (FIXTURES / "qwen3.jinja").read_text()
    config = json.loads((hf3 / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (hf3 / "tokenizer_config.json").write_text(json.dumps(config))
    (hf3 / "chat_template.jinja").write_text(source)
    assert cli_main(["convert", "import", str(hf3), str(tmp_path / "base3")]) == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf3)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf3).eval()
    assert hf_tok.chat_template == source
    conversations = [CHATS[0][:2], [{"role": "user", "content": "how are you"}]]
    ask = tmp_path / "ask.jsonl"
    ask.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    capsys.readouterr()
    assert cli_main(["generate", "--checkpoint", str(tmp_path / "base3"), "--messages", str(ask), "--temperature", "0",
                     "--max-new-tokens", "6", "--template-kwargs", '{"enable_thinking": false}']) == 0
    replies = [json.loads(line)["reply"] for line in capsys.readouterr().out.splitlines()]
    assert len(replies) == 2 and all(replies), replies
    lm = qkv.load(tmp_path / "base3")
    for messages, reply in zip(conversations, replies, strict=True):
        ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                         enable_thinking=False)["input_ids"]
        assert hf_tok.decode(ids).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        assert lm.chat_prompt_ids(messages, enable_thinking=False) == list(ids) != lm.chat_prompt_ids(messages)
        new = _greedy_hf(hf, list(ids), 6, set(lm.stop_ids))
        assert reply == hf_tok.decode(new, skip_special_tokens=True), (reply, new)

    for run, text, message in [
            (tmp_path / "base3", '{"enable_thinking": "no"}', "--template-kwargs.enable_thinking='no' must be true or false"),
            (tmp_path / "base3", "{enable_thinking: false}", "--template-kwargs '{enable_thinking: false}' is not JSON"),
            (exported / "sft", '{"enable_thinking": false}',
             "--template-kwargs.enable_thinking: the checkpoint's chat template does not read 'enable_thinking'")]:
        capsys.readouterr()
        assert cli_main(["generate", "--checkpoint", str(run), "--messages", str(ask), "--template-kwargs", text]) == 2
        captured = capsys.readouterr()
        err = captured.err.strip().splitlines()
        assert not captured.out and len(err) == 1 and err[0].startswith(f"qkv: error: {message}"), err


@pytest.mark.slow
def test_template_kwargs_in_the_finetuning_config_are_checked_before_anything_is_written(exported, capsys, tmp_path):
    train = tmp_path / "chats.jsonl"
    train.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS))
    for kwargs, message in [("{enable_thinking: false}", "tokenizer.chat_template_kwargs.enable_thinking: the "
                             "checkpoint's chat template does not read 'enable_thinking'"),
                            ("{enable_thinking: maybe}", "tokenizer.chat_template_kwargs.enable_thinking='maybe' "
                             "must be true or false")]:
        run_dir = tmp_path / "never"
        capsys.readouterr()
        code = cli_main(["finetune", "sft-tiny", f"finetune.init_from={exported / 'base'}",
                         f"finetune.train_path={train}", f"train.run_dir={run_dir}", "data.seq_len=128",
                         "train.steps=1", "train.progress=false", f"tokenizer.chat_template_kwargs={kwargs}"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and not run_dir.exists() and len(err) == 1 and err[0].startswith(f"qkv: error: {message}"), err


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:os.fork")  # pexpect forks and at once execs the qkv command
def test_qkv_chat_in_a_real_terminal(exported):
    pexpect = pytest.importorskip("pexpect")
    qkv_bin = str(Path(sys.executable).parent / "qkv")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    child = pexpect.spawn(qkv_bin, ["chat", "--checkpoint", str(exported / "sft"), "--temperature", "0",
                                    "--max-new-tokens", "120"], env=env, encoding="utf-8", timeout=240)
    log = []
    try:
        child.expect(r"Ctrl-D leaves\.")
        child.expect("> ")
        child.sendline("/system Be brief.")
        child.expect(r"\(system message set\)")
        child.expect("> ")
        for turn in ("hello cat", "how are you"):
            child.sendline(turn)
            child.expect("> ")
            log.append(child.before)
        child.sendline("hello dog")
        child.expect(r"hello dog\r\n")
        child.expect(r"\S")  # the reply has begun
        child.sendintr()
        child.expect("> ")
        log.append(child.before)
        child.sendline("/reset")
        child.expect(r"\(conversation cleared\)")
        child.expect("> ")
        child.sendline("hello owl")
        child.expect("> ")
        log.append(child.before)
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    text = "".join(log)
    assert child.exitstatus == 0, (child.exitstatus, text)
    assert "Traceback" not in text and "qkv: error" not in text, text
    assert "^C [stopped]" in text and text.count("fine") > 3, text  # replies streamed; the third one cut short
