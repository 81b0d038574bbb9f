"""Chat templates: qkv's rendering, ids and assistant masks equal transformers' apply_chat_template's on real
templates (tests/fixtures/chat_templates), SFT masks train exactly the assistant turns, refusals name file:line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from qkv.data.chat_template import (PLAIN_TEMPLATE, ChatTemplate, TemplateError, encode_rendered, read_template,
                                    span_mask, special_token_strings, stop_ids)
from qkv.errors import UserError
from qkv.data.hf_tokenizer import HFTokenizer
from qkv.data.sft import DataError, PackedSFTIterator, load_sft

FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"

# (bos, eos, the template's other special tokens) per fixture.
SPECIALS = {
    "llama-3.1-instruct": ("<|begin_of_text|>", "<|eot_id|>", ["<|start_header_id|>", "<|end_header_id|>",
                                                              "<|eom_id|>", "<|python_tag|>", "<|end_of_text|>"]),
    "llama-3.2-instruct": ("<|begin_of_text|>", "<|eot_id|>", ["<|start_header_id|>", "<|end_header_id|>",
                                                              "<|end_of_text|>"]),
    "qwen2.5-instruct": ("<|endoftext|>", "<|im_end|>", ["<|im_start|>"]),
    "qwen3": ("<|endoftext|>", "<|im_end|>", ["<|im_start|>"]),
    "mistral-7b-instruct-v0.3": ("<s>", "</s>", ["[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                                                 "[TOOL_CALLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]),
    "gemma-it": ("<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"]),
    "gemma-3-it": ("<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>", "<start_of_image>"]),
    "chatml-generation": ("<|endoftext|>", "<|im_end|>", ["<|im_start|>"]),
}
# The templates that take tools= (a tool list, assistant tool calls, tool results).
WITH_TOOLS = ["llama-3.1-instruct", "llama-3.2-instruct", "qwen2.5-instruct", "qwen3", "mistral-7b-instruct-v0.3"]

SYSTEM = {"role": "system", "content": "You are terse."}
U1, A1 = {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}
U2, A2 = {"role": "user", "content": "Und auf Deutsch? Ünïcödé ✓ 日本"}, {"role": "assistant", "content": "Vier. ✓"}
EMPTY_USER = {"role": "user", "content": ""}
EMPTY_ASSISTANT = {"role": "assistant", "content": ""}
TOOL_CALL = {"role": "assistant", "content": "", "tool_calls": [  # Mistral wants 9-character ids
    {"id": "call12345", "type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}]}
TOOL_RESULT = {"role": "tool", "content": "4", "tool_call_id": "call12345"}
IMAGE_USER = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " What is in it? "}]}
CONVERSATIONS = {
    "single": [U1, A1],
    "system_single": [SYSTEM, U1, A1],
    "multi": [U1, A1, U2, A2],
    "system_multi": [SYSTEM, U1, A1, U2, A2],
    "empty_user": [EMPTY_USER, A1],
    "empty_assistant": [U1, EMPTY_ASSISTANT, U2, A2],
    "open": [U1, A1, U2],
    "roles_not_alternating": [U1, U2, A1],
    "content_parts": [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, IMAGE_USER, A1],
    "reasoning": [U1, {"role": "assistant", "content": "4.", "reasoning": "Two and two."}],  # transformers aliases
}
TOOL_CONVERSATIONS = {
    "tool_call": [SYSTEM, U1, TOOL_CALL, TOOL_RESULT, A1],
    "tool_call_open": [U1, TOOL_CALL, TOOL_RESULT],
}
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                           "parameters": {"type": "object", "properties": {
                                               "a": {"type": "integer"}, "b": {"type": "integer"}}}}}]


@pytest.fixture(scope="module")
def tokenizers_by_template():
    """A byte-level BPE trained here per template, with its special tokens: (qkv HFTokenizer, transformers')."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [m["content"] for c in CONVERSATIONS.values() for m in c if isinstance(m["content"], str)] * 20
    corpus += ["System: User: Assistant: model Given the following functions"] * 20
    out = {}
    for name, (bos, eos, extra) in SPECIALS.items():
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[bos, eos, *extra],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(corpus, trainer)
        text = tok.to_str()
        ours = HFTokenizer(text, {"bos": tok.token_to_id(bos), "eos": tok.token_to_id(eos)})
        theirs = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(text), bos_token=bos, eos_token=eos)
        out[name] = (ours, theirs)
    return out


def _cases():
    for name in SPECIALS:
        for conv in CONVERSATIONS:
            yield name, conv, None
    for name in WITH_TOOLS:
        for conv in TOOL_CONVERSATIONS:
            yield name, conv, TOOLS


def _compare(tokenizers, name, messages, tools=None, **kwargs):
    """qkv's text and ids equal apply_chat_template's, with and without the generation prompt, and its assistant
    mask equals return_assistant_tokens_mask's where the template has {% generation %} blocks; a conversation the
    template refuses is refused by qkv too, with the template's message on one line. Returns transformers' texts."""
    ours, theirs = tokenizers[name]
    source = (FIXTURES / f"{name}.jinja").read_text()
    template = ChatTemplate(source, special_token_strings(ours)).with_kwargs(kwargs)
    texts = []
    for gen in (False, True):
        try:
            want = theirs.apply_chat_template(messages, tools=tools, chat_template=source, tokenize=False,
                                              add_generation_prompt=gen, **kwargs)
        except Exception as err:  # the template refuses this conversation: qkv refuses it too, in one line
            with pytest.raises(TemplateError) as ours_err:
                template.render(messages, add_generation_prompt=gen, tools=tools)
            assert str(err).splitlines()[0] in str(ours_err.value) and "\n" not in str(ours_err.value)
            return None
        assert template.render(messages, add_generation_prompt=gen, tools=tools) == want
        want_ids = theirs.apply_chat_template(messages, tools=tools, chat_template=source, tokenize=True,
                                              return_dict=True, add_generation_prompt=gen, **kwargs)["input_ids"]
        assert encode_rendered(ours, want)[0] == list(want_ids)
        texts.append(want)
    if template.has_generation:
        got = theirs.apply_chat_template(messages, tools=tools, chat_template=source, tokenize=True,
                                         return_dict=True, return_assistant_tokens_mask=True, **kwargs)
        text, spans = template.assistant_spans(messages, tools=tools)
        ids, offsets = encode_rendered(ours, text)
        assert ids == list(got["input_ids"]) and span_mask(offsets, spans) == list(got["assistant_masks"])
        assert 1 in got["assistant_masks"] or not any(m["role"] == "assistant" for m in messages)
    return texts


@pytest.mark.parametrize("name,conv,tools", list(_cases()))
def test_rendered_text_ids_and_masks_equal_transformers(tokenizers_by_template, name, conv, tools):
    messages = (TOOL_CONVERSATIONS if tools else CONVERSATIONS)[conv]
    texts = _compare(tokenizers_by_template, name, messages, tools)
    if tools and texts:  # the tool list and the call are in the text, as the template writes them
        assert '"a": 2' in texts[0] and "Add two numbers" in texts[0], texts[0]


def test_each_template_renders_what_it_is_known_for(tokenizers_by_template):
    """Guards against a wrong or truncated fixture: the parts each model's own template is known to write."""
    def text(name, messages, tools=None, **kwargs):
        return _compare(tokenizers_by_template, name, messages, tools, **kwargs)[1]

    llama31 = text("llama-3.1-instruct", [SYSTEM, U1, TOOL_CALL, TOOL_RESULT, A1], TOOLS)
    assert "Environment: ipython\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024" in llama31
    assert '{"name": "add", "parameters": {"a": 2, "b": 2}}<|eot_id|>' in llama31
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n"4"<|eot_id|>' in llama31  # the result as JSON
    assert "Today Date: 26 Jul 2024" not in text("llama-3.2-instruct", [U1, A1], date_string="1 Jan 2025")
    mistral = text("mistral-7b-instruct-v0.3", [SYSTEM, U1, TOOL_CALL, TOOL_RESULT, A1, U2], TOOLS)
    assert mistral.startswith("<s>[INST] What is 2+2?[/INST][TOOL_CALLS] [{")
    assert '[TOOL_RESULTS] {"content": 4, "call_id": "call12345"}[/TOOL_RESULTS] 4.</s>[AVAILABLE_TOOLS] [' in mistral
    assert mistral.endswith("[INST] You are terse.\n\nUnd auf Deutsch? Ünïcödé ✓ 日本[/INST]")  # system: last turn
    gemma3 = text("gemma-3-it", CONVERSATIONS["content_parts"])
    assert gemma3 == ("<bos><start_of_turn>user\nBe brief.\n\n<start_of_image>What is in it?<end_of_turn>\n"
                      "<start_of_turn>model\n4.<end_of_turn>\n<start_of_turn>model\n")
    assert text("gemma-3-it", [SYSTEM, U1]).startswith("<bos><start_of_turn>user\nYou are terse.\n\nWhat is 2+2?")
    assert "<think>\nTwo and two.\n</think>\n\n4.<|im_end|>" in text("qwen3", CONVERSATIONS["reasoning"])


def test_qwen3_enable_thinking_false_renders_as_transformers(tokenizers_by_template):
    for messages in ([U1], [SYSTEM, U1, A1, U2], [U1, A1]):
        on = _compare(tokenizers_by_template, "qwen3", messages)
        off = _compare(tokenizers_by_template, "qwen3", messages, enable_thinking=False)
        assert off[1].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") and on[1] != off[1]


def test_template_kwargs_are_checked_and_name_the_key(tokenizers_by_template):
    ours, _ = tokenizers_by_template["qwen3"]
    qwen3 = ChatTemplate((FIXTURES / "qwen3.jinja").read_text(), special_token_strings(ours), "chat template qwen3")
    bad = [({"enable_thinking": "no"}, r"^x\.enable_thinking='no' must be true or false$"),
           ({"enable_thnking": False}, r"^x\.enable_thnking: chat template qwen3 does not read 'enable_thnking' "
                                       r"\(it reads .*enable_thinking.*\): remove it or fix its name$"),
           ({"tools": []}, r"^x\.tools: set by qkv itself"),
           ({"a b": 1}, r"^x: 'a b' is not a template variable name"),
           ({"enable_thinking": float("nan")}, r"must be a JSON value"),
           ([1], r"^x must be a mapping of template variables")]
    for kwargs, message in bad:
        with pytest.raises(UserError, match=message):
            qwen3.with_kwargs(kwargs, "x")
    assert qwen3.with_kwargs({"enable_thinking": False}).kwargs == {"enable_thinking": False}
    from qkv.train.config import load_config
    with pytest.raises(UserError, match=r"tokenizer\.chat_template_kwargs\.enable_thinking=0 must be true or false"):
        load_config("sft-tiny", ["tokenizer.chat_template_kwargs={enable_thinking: 0}"])
    cfg = load_config("sft-tiny", ["tokenizer.chat_template_kwargs.enable_thinking=false"])
    assert cfg.tokenizer.chat_template_kwargs == {"enable_thinking": False}


def test_prefix_spans_equal_generation_spans_and_qwen3_multi_turn_is_refused(tokenizers_by_template):
    ours, _ = tokenizers_by_template["chatml-generation"]
    source = (FIXTURES / "chatml-generation.jinja").read_text()
    with_blocks = ChatTemplate(source, special_token_strings(ours))
    without = ChatTemplate(source.replace("{%- generation %}", "").replace("{%- endgeneration %}", ""),
                           special_token_strings(ours))
    assert with_blocks.has_generation and not without.has_generation
    for name, messages in CONVERSATIONS.items():
        if name != "content_parts":  # ChatML joins strings only
            assert with_blocks.assistant_spans(messages) == without.assistant_spans(messages)
    text, spans = without.assistant_spans([SYSTEM, U1, A1, U2, A2])
    assert [text[a:b] for a, b in spans] == ["4.<|im_end|>", "Vier. ✓<|im_end|>"]

    ours3, _ = tokenizers_by_template["qwen3"]
    qwen3 = ChatTemplate((FIXTURES / "qwen3.jinja").read_text(), special_token_strings(ours3))
    text, spans = qwen3.assistant_spans([U1, A1])  # single-turn: fine, the empty think block is trained
    assert [text[a:b] for a, b in spans] == ["<think>\n\n</think>\n\n4.<|im_end|>"]
    with pytest.raises(TemplateError, match=r"renders earlier turns differently.*Qwen 3.*single-turn"):
        qwen3.assistant_spans([U1, A1, U2, A2])
    assert stop_ids(qwen3, ours3) == sorted({ours3.eos_id, ours3.piece_to_id("<|im_end|>")})
    llama, _ = tokenizers_by_template["llama-3.2-instruct"]
    t = ChatTemplate((FIXTURES / "llama-3.2-instruct.jinja").read_text(), special_token_strings(llama))
    assert llama.piece_to_id("<|eot_id|>") in stop_ids(t, llama)


def test_templates_are_read_from_hf_files(tmp_path):
    source = (FIXTURES / "qwen3.jinja").read_text()
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "tokenizer_config.json").write_text(json.dumps({"chat_template": source}))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": source}]}))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "chat_template.jinja").write_text(source)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "chat_template.json").write_text(json.dumps({"chat_template": source}))
    for d in "abcd":
        assert read_template(tmp_path / d) == source
    assert read_template(tmp_path) is None


def _hf_tokenizer_dir(tmp_path: Path, template: str,
                      specials: tuple[str, ...] = ("<|endoftext|>", "<|im_end|>", "<|im_start|>")) -> HFTokenizer:
    """A small byte-level BPE with ``specials`` (the first is bos, the second eos)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["hello there", "how are you", "fine thanks"] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=list(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return HFTokenizer(tok.to_str(), {"bos": 0, "eos": 1})


# (fixture, the tokenizer's specials, the end-of-turn token trained after each reply)
PACKED = [("qwen2.5-instruct", ("<|endoftext|>", "<|im_end|>", "<|im_start|>"), "<|im_end|>"),
          ("llama-3.1-instruct", ("<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"),
           "<|eot_id|>"),
          ("gemma-3-it", ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"), "<end_of_turn>")]


@pytest.mark.parametrize("name,specials,end", PACKED, ids=[p[0] for p in PACKED])
def test_packed_sft_batch_trains_exactly_the_assistant_contents_and_end_of_turn(tmp_path, name, specials, end):
    tok = _hf_tokenizer_dir(tmp_path, "", specials)
    source = (FIXTURES / f"{name}.jinja").read_text()
    template = ChatTemplate(source, special_token_strings(tok))
    records = [{"messages": [SYSTEM, {"role": "user", "content": f"hello {i}"},
                             {"role": "assistant", "content": f"fine {i}"},
                             {"role": "user", "content": "how are you"},
                             {"role": "assistant", "content": f"thanks {i}"}]} for i in range(6)]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    data = load_sft(str(path), tok.encode, bos_id=tok.bos_id, eos_id=tok.eos_id, seq_len=200, template=template,
                    tokenizer=tok)
    batch = next(PackedSFTIterator(data.items, seq_len=200, batch_size=2, seed=0, shuffle=False))
    seen = 0
    for r in range(2):
        for s in sorted(set(batch["segment_ids"][r].tolist()) - {0}):
            cols = batch["segment_ids"][r] == s
            targets, mask = batch["targets"][r][cols], batch["loss_mask"][r][cols]
            runs, current = [], []
            for t, m in zip(targets.tolist(), mask.tolist()):
                if m:
                    current.append(t)
                elif current:
                    runs.append(current)
                    current = []
            runs += [current] if current else []
            pieces = [tok._tok_specials.decode(run, skip_special_tokens=False) for run in runs]
            i = int(pieces[0].split()[1].split("<")[0])
            assert pieces == [f"fine {i}{end}", f"thanks {i}{end}"], pieces
            seen += 1
    assert seen >= 2


def test_sft_records_with_tools_train_the_tool_call_and_the_reply(tmp_path, tokenizers_by_template):
    ours, theirs = tokenizers_by_template["qwen2.5-instruct"]
    source = (FIXTURES / "qwen2.5-instruct.jinja").read_text()
    messages = [SYSTEM, U1, TOOL_CALL, TOOL_RESULT, A1]
    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps({"messages": messages, "tools": TOOLS}) + "\n")
    data = load_sft(str(path), ours.encode, bos_id=ours.bos_id, eos_id=ours.eos_id, seq_len=1000,
                    template=ChatTemplate(source, special_token_strings(ours)), tokenizer=ours)
    (ex,) = data.items
    want = theirs.apply_chat_template(messages, tools=TOOLS, chat_template=source, tokenize=True, return_dict=True)
    assert [int(ex.inputs[0]), *ex.targets.tolist()] == list(want["input_ids"])
    trained = ours._tok_specials.decode(ex.targets[ex.loss_mask == 1].tolist(), skip_special_tokens=False)
    assert trained == ('<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 2}}\n</tool_call><|im_end|>'
                       "4.<|im_end|>"), trained
    path.write_text(json.dumps({"messages": messages, "tools": "add"}) + "\n")
    with pytest.raises(DataError, match=r":1: 'tools' must be a list of tool objects"):
        load_sft(str(path), ours.encode, bos_id=ours.bos_id, eos_id=ours.eos_id, seq_len=1000,
                 template=ChatTemplate(source, special_token_strings(ours)), tokenizer=ours)


BAD = [
    ('{"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}',
     "gemma-it.jinja", "System role not supported"),
    ('{"messages": [{"role": "user", "content": "u"}, {"role": "user", "content": "v"}, '
     '{"role": "assistant", "content": "a"}]}', "mistral-7b-instruct-v0.3.jinja", "roles must alternate"),
    ('{"messages": [{"role": "user", "content": "u"}, {"role": "user", "content": "v"}, '
     '{"role": "assistant", "content": "a"}]}', "gemma-3-it.jinja", "roles must alternate"),
    ('{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "a"}]}',
     "chatml-generation.jinja", "Unknown role: robot"),
]


@pytest.mark.parametrize("line,fixture,message", BAD, ids=[m for _, _, m in BAD])
def test_a_template_that_raises_names_file_and_line(tmp_path, line, fixture, message):
    tok = _hf_tokenizer_dir(tmp_path, "")
    template = ChatTemplate((FIXTURES / fixture).read_text(), special_token_strings(tok), f"chat template {fixture}")
    path = tmp_path / "bad.jsonl"
    good = '{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}'
    path.write_text(good + "\n\n" + line + "\n")
    with pytest.raises(DataError) as err:
        load_sft(str(path), tok.encode, bos_id=tok.bos_id, eos_id=tok.eos_id, seq_len=200, template=template,
                 tokenizer=tok)
    text = str(err.value)
    assert text.startswith(f"{path}:3: ") and message in text and fixture in text and "\n" not in text, text


def test_the_plain_template_keeps_the_old_layout():
    from qkv.data import Tokenizer, train_tokenizer
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        tok = Tokenizer.load(train_tokenizer(["System: User: Assistant: hi ok be brief again\n"] * 5,
                                             Path(d) / "t", vocab_size=300, model_type="char"))
    plain = ChatTemplate(PLAIN_TEMPLATE, special_token_strings(tok))
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "ok"}, {"role": "user", "content": "again"},
                {"role": "assistant", "content": "ok ok"}]
    assert plain.render(messages) == "<s>System: be brief\nUser: hi\nAssistant: ok</s>\nUser: again\nAssistant: ok ok</s>"
    assert plain.render(messages[:2], add_generation_prompt=True) == "<s>System: be brief\nUser: hi\nAssistant: "
    text, spans = plain.assistant_spans(messages)
    ids, offsets = encode_rendered(tok, text, [e for s in spans for e in s])
    old = ([tok.bos_id] + tok.encode("System: be brief\nUser: hi\nAssistant: ") + tok.encode("ok") + [tok.eos_id]
           + tok.encode("\nUser: again\nAssistant: ") + tok.encode("ok ok") + [tok.eos_id])
    assert ids == old
    trained = [i for i, m in zip(ids, span_mask(offsets, spans)) if m]
    assert trained == tok.encode("ok") + [tok.eos_id] + tok.encode("ok ok") + [tok.eos_id]


def test_dpo_with_messages_scores_only_the_next_assistant_turn(tmp_path):
    from qkv.data.sft import load_dpo

    tok = _hf_tokenizer_dir(tmp_path, "")
    template = ChatTemplate((FIXTURES / "chatml-generation.jinja").read_text(), special_token_strings(tok))
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hello"},
                                             {"role": "assistant", "content": "there"},
                                             {"role": "user", "content": "how are you"}],
                                "chosen": "fine thanks", "rejected": "how"}) + "\n")
    data = load_dpo(str(path), tok.encode, bos_id=tok.bos_id, eos_id=tok.eos_id, seq_len=100, template=template,
                    tokenizer=tok)
    (chosen, rejected), = data.items
    for ex, reply in ((chosen, "fine thanks"), (rejected, "how")):
        trained = tok._tok_specials.decode(ex.targets[ex.loss_mask == 1].tolist(), skip_special_tokens=False)
        assert trained == reply + "<|im_end|>"  # the earlier assistant turn ("there") is prompt, not scored
    assert chosen.inputs[:10].tolist() == rejected.inputs[:10].tolist()
