"""Fine-tuning data: SFT and preference (DPO) examples read from JSONL, in the batch contract.

Records, one JSON object per line (blank lines are ignored):

  SFT   {"prompt": "...", "response": "..."}
        {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...], "tools": [...]?}
  DPO   {"prompt": "...", "chosen": "...", "rejected": "..."}

Token layout of one SFT example (ids of separately encoded pieces, concatenated):

  prompt/response   [bos] encode(prompt) | encode(response) [eos]
  messages          [bos] encode("System: s\\nUser: u\\nAssistant: ") | encode(a1) [eos]
                          encode("\\nUser: u2\\nAssistant: ") | encode(a2) [eos] ...

Everything left of a ``|`` is prompt; the response pieces (and the eos that ends each) are what the
model learns: ``loss_mask`` is 1 exactly on the targets that are response tokens, 0 on prompt tokens
and padding. Contiguous prompt text is encoded as one string, so generating from
``chat_prompt(messages)`` (or the plain prompt) sees the same ids as training did. The template is
deliberately plain text: ``"System: "``, ``"User: "`` and ``"Assistant: "`` headers, one message per
line, no special tokens besides eos after each assistant turn.

Bad input stops with one line naming ``file:line`` (:class:`DataError`): invalid JSON, a line that
is not an object, missing or non-string fields, unknown roles, an empty (whitespace-only) response,
chosen or rejected, a conversation without an assistant turn. An example longer than ``seq_len``
tokens is an error too, unless ``overlong="skip"``: then it is left out and counted (the count is in
``ExampleSet.skipped`` and logged) — never truncated, so no response is silently cut.

Packing (SFT): whole examples are laid into rows in a seeded order, one after another, and a row is
closed when the next example does not fit, so an example is never split across rows; each example
is its own segment with positions restarting at 0. DPO rows are not packed: each pair takes two
adjacent rows (chosen, then rejected), padded. The iterators are deterministic and their state is
JSON ``{"epoch", "next", "examples"}``: restoring it continues exactly where the saved run was.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .chat_template import PLAIN_TEMPLATE, ChatTemplate, TemplateError, encode_rendered, span_mask
from .examples import (DataError, Example, ExampleSet, OrderedIterator, PackingIterator, field_text, jsonl_files,
                       read_jsonl, rows_to_batch)
from qkv.errors import UserError

ROLE_HEADERS = {"system": "System: ", "user": "User: ", "assistant": "Assistant: "}


def chat_prompt(messages: Sequence[dict[str, str]]) -> str:
    """qkv's plain template of a conversation so far, without bos, ending with the assistant header (what to
    pass to ``LanguageModel.generate``, which adds bos). ``ChatTemplate.render(..., add_generation_prompt=True)``
    is the general form (it writes the special tokens itself)."""
    return ChatTemplate(PLAIN_TEMPLATE, {"bos_token": "", "eos_token": ""}).render(
        list(messages), add_generation_prompt=True)


class _IdsOnly:
    """A tokenizer made of an encode function and bos/eos ids, for templates that spell them as sentinels."""

    _BOS, _EOS = "\x00qkv-bos\x00", "\x00qkv-eos\x00"

    def __init__(self, encode: Callable[[str], list[int]], bos_id: int, eos_id: int):
        self.encode, self.bos_id, self.eos_id, self.pad_id = encode, bos_id, eos_id, None

    def id_to_piece(self, i: int) -> str:
        return self._BOS if i == self.bos_id else self._EOS

    def template(self) -> ChatTemplate:
        return ChatTemplate(PLAIN_TEMPLATE, {"bos_token": self._BOS, "eos_token": self._EOS}, "qkv's plain chat template")


def check_messages(messages: Any, where: str) -> list[dict[str, Any]]:
    """A conversation's shape: a non-empty list of objects with a string role and string content (an
    assistant turn may instead carry tool_calls); the roles themselves are the template's to accept."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
        role = field_text(m, "role", f"{where}: messages[{i}]", True)
        if role == "assistant" and m.get("tool_calls") and m.get("content") in (None, ""):
            continue
        field_text(m, "content", f"{where}: messages[{i}]", role == "assistant")
    return messages


def check_tools(record: dict[str, Any], where: str) -> list[dict[str, Any]] | None:
    """A record's optional ``tools``: the tool list the template is rendered with (``tools=``), as JSON schemas."""
    tools = record.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError(f"{where}: 'tools' must be a list of tool objects, e.g. "
                        '[{"type": "function", "function": {"name": ..., "parameters": {...}}}]')
    return tools


def template_example(messages: list[dict[str, Any]], template: ChatTemplate, tok: Any, where: str,
                     last_turn_only: bool = False, tools: list[dict[str, Any]] | None = None) -> tuple[Example, int]:
    """(the example, its prompt length): the rendered conversation (with ``tools``), trained on the assistant
    spans (the last one only with ``last_turn_only``, DPO) as ``ChatTemplate.assistant_spans`` finds them."""
    try:
        text, spans = template.assistant_spans(messages, tools=tools)
    except TemplateError as err:
        raise DataError(f"{where}: {err}") from None
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant message to learn from")
    spans = spans[-1:] if last_turn_only else spans
    tokens, offsets = encode_rendered(tok, text, [e for span in spans for e in span])
    trained = span_mask(offsets, spans)
    if 1 not in trained:
        raise DataError(f"{where}: {template.origin} wrote no assistant text for this conversation: check its roles")
    return _example(tokens, trained, where)


def _example(tokens: list[int], trained: list[int], where: str) -> tuple[Example, int]:
    prompt_len = trained.index(1) if 1 in trained else len(trained)
    tok = np.asarray(tokens, np.int32)
    mask = np.asarray(trained[1:], np.int32)  # target t is token t+1: counted when that token is trained
    return Example(tok[:-1], tok[1:], mask, where), prompt_len


def sft_spans(record: dict[str, Any], where: str) -> list[tuple[str, bool]]:
    """(text, trained) pieces of a prompt/response SFT record."""
    if "prompt" not in record and "response" not in record:
        raise DataError(f"{where}: expected 'prompt' and 'response' fields, or 'messages'")
    return [(field_text(record, "prompt", where, False), False), (field_text(record, "response", where, True), True)]


def encode_spans(spans: Sequence[tuple[str, bool]], encode: Callable[[str], list[int]], bos_id: int,
                 eos_id: int, where: str) -> tuple[Example, int]:
    """(the example, its prompt length in tokens): [bos] + pieces, eos after each trained piece."""
    tokens, trained = [bos_id], [0]
    for text, is_trained in spans:
        ids = encode(text) if text else []
        if is_trained:
            ids = ids + [eos_id]
        tokens += ids
        trained += [int(is_trained)] * len(ids)
    return _example(tokens, trained, where)


def _fits(example: Example, prompt_len: int, seq_len: int, overlong: str, what: str) -> bool:
    if len(example) <= seq_len:
        return True
    if overlong == "skip":
        return False
    part = (f"its prompt alone has {prompt_len} tokens" if prompt_len >= seq_len
            else f"prompt {prompt_len} + response {len(example) + 1 - prompt_len} tokens")
    raise DataError(f"{example.where}: {what} has {len(example)} tokens ({part}), more than data.seq_len={seq_len}: "
                    "shorten it, raise data.seq_len, or set finetune.overlong=skip to leave such examples out")


def _chat(template: ChatTemplate | None, tokenizer: Any, encode: Callable[[str], list[int]], bos_id: int,
          eos_id: int) -> tuple[ChatTemplate, Any]:
    if template is not None and tokenizer is not None:
        return template, tokenizer
    ids = _IdsOnly(encode, bos_id, eos_id)
    return ids.template(), ids


def load_sft(pattern: str, encode: Callable[[str], list[int]], *, bos_id: int, eos_id: int, seq_len: int,
             overlong: str = "error", template: ChatTemplate | None = None, tokenizer: Any = None) -> ExampleSet:
    """Every SFT example of the matching JSONL files, validated and tokenized, in file order; ``messages``
    records are rendered by ``template`` and tokenized by ``tokenizer`` (both None: qkv's plain template)."""
    template, tokenizer = _chat(template, tokenizer, encode, bos_id, eos_id)
    out = ExampleSet([], files=jsonl_files(pattern))
    for where, record in read_jsonl(pattern):
        if "messages" in record:
            example, prompt_len = template_example(check_messages(record["messages"], where), template, tokenizer,
                                                   where, tools=check_tools(record, where))
        else:
            example, prompt_len = encode_spans(sft_spans(record, where), encode, bos_id, eos_id, where)
        if _fits(example, prompt_len, seq_len, overlong, "the example"):
            out.items.append(example)
        else:
            out.skipped += 1
    if not out.items:
        raise DataError(f"{pattern}: no usable examples" + (f" ({out.skipped} longer than data.seq_len={seq_len} "
                                                             "were skipped)" if out.skipped else ""))
    return out


def load_dpo(pattern: str, encode: Callable[[str], list[int]], *, bos_id: int, eos_id: int, seq_len: int,
             overlong: str = "error", template: ChatTemplate | None = None, tokenizer: Any = None) -> ExampleSet:
    """Every (chosen, rejected) pair of the matching JSONL files, as two Examples sharing the prompt. A
    ``messages`` record is the conversation so far; chosen/rejected are the assistant's next turn, rendered
    by the chat template (only that turn is scored)."""
    template, tokenizer = _chat(template, tokenizer, encode, bos_id, eos_id)
    out = ExampleSet([], files=jsonl_files(pattern))
    for where, record in read_jsonl(pattern):
        messages = check_messages(record["messages"], where) if "messages" in record else None
        prompt = None if messages is not None else field_text(record, "prompt", where, False)
        pair, ok = [], True
        for key in ("chosen", "rejected"):
            reply = field_text(record, key, where, True)
            if messages is not None:
                example, prompt_len = template_example([*messages, {"role": "assistant", "content": reply}],
                                                       template, tokenizer, where, last_turn_only=True,
                                                       tools=check_tools(record, where))
            else:
                example, prompt_len = encode_spans([(prompt, False), (reply, True)], encode, bos_id, eos_id, where)
            ok = ok and _fits(example, prompt_len, seq_len, overlong, f"prompt + {key}")
            pair.append(example)
        if ok:
            out.items.append(tuple(pair))
        else:
            out.skipped += 1
    if not out.items:
        raise DataError(f"{pattern}: no usable preference pairs" + (f" ({out.skipped} skipped as overlong)"
                                                                    if out.skipped else ""))
    return out


class PackedSFTIterator(PackingIterator):
    """Endless SFT batches [batch_size, seq_len]: whole examples packed first-come into rows."""

    def __init__(self, examples: Sequence[Example], *, seq_len: int, batch_size: int, seed: int,
                 shuffle: bool = True):
        super().__init__(examples, limits=(seq_len,), batch_size=batch_size, seed=seed, shuffle=shuffle)
        self.seq_len = seq_len

    def _batch(self, rows: list[list[Example]]) -> dict[str, np.ndarray]:
        return rows_to_batch(rows, self.seq_len, self.batch_size)


class DPOIterator(OrderedIterator):
    """Endless DPO batches: batch_size // 2 pairs, chosen in even rows, rejected in the odd row after."""

    def __init__(self, pairs: Sequence[tuple[Example, Example]], *, seq_len: int, batch_size: int, seed: int,
                 shuffle: bool = True):
        if batch_size % 2:
            raise UserError(f"train.batch_size={batch_size} must be even for DPO: each pair takes two rows")
        super().__init__(pairs, seed, shuffle)
        self.seq_len, self.batch_size = seq_len, batch_size

    def __next__(self) -> dict[str, np.ndarray]:
        rows = []
        for _ in range(self.batch_size // 2):
            chosen, rejected = self._current()
            rows += [[chosen], [rejected]]
            self._advance()
        return rows_to_batch(rows, self.seq_len, self.batch_size)


def eval_batches(items: Sequence[Any], *, dpo: bool, seq_len: int, batch_size: int,
                 max_batches: int = 0) -> list[dict[str, np.ndarray]]:
    """One ordered pass (at most ``max_batches``, 0 = all), the last batch padded with empty rows."""
    batches: list[dict[str, np.ndarray]] = []
    rows: list[list[Example]] = []
    used = seq_len + 1
    for item in items:
        if dpo:
            rows += [[item[0]], [item[1]]]
        else:
            if used + len(item) > seq_len:
                rows.append([])
                used = 0
            rows[-1].append(item)
            used += len(item)
        while len(rows) > batch_size or (dpo and len(rows) == batch_size):
            batches.append(rows_to_batch(rows[:batch_size], seq_len, batch_size))
            rows = rows[batch_size:]
        if max_batches and len(batches) >= max_batches:
            return batches[:max_batches]
    if rows:
        batches.append(rows_to_batch(rows, seq_len, batch_size))
    return batches[:max_batches] if max_batches else batches
