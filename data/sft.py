"""Fine-tuning data: SFT and preference (DPO) examples read from JSONL, in the batch contract.

Records, one JSON object per line (blank lines are ignored):

  SFT   {"prompt": "...", "response": "..."}
        {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
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

import glob
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROLE_HEADERS = {"system": "System: ", "user": "User: ", "assistant": "Assistant: "}


class DataError(ValueError):
    """A fine-tuning record that cannot be used, named by file:line."""


@dataclass(frozen=True)
class Example:
    """One token sequence: inputs/targets/loss_mask int32 arrays of equal length (<= seq_len)."""

    inputs: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    where: str  # file:line

    def __len__(self) -> int:
        return len(self.inputs)


@dataclass
class ExampleSet:
    """Examples (SFT: Example; DPO: (chosen, rejected) pairs) and how many overlong ones were skipped."""

    items: list[Any]
    skipped: int = 0
    files: list[str] = field(default_factory=list)
    empty: int = 0  # seq2seq: pairs left out for an empty side (see seq2seq.tokenize_pairs)


def chat_prompt(messages: Sequence[dict[str, str]]) -> str:
    """The template text of a conversation so far, ending with the assistant header: what to pass to
    ``qkv generate`` (or ``LanguageModel.generate``) to get the next assistant turn."""
    text = "".join(f"{ROLE_HEADERS[m['role']]}{m['content']}\n" for m in messages)
    return text + ROLE_HEADERS["assistant"]


_JSONL_FIX = "set finetune.train_path (or eval_path) to a .jsonl file or glob"


def jsonl_files(pattern: str, what: str = "JSONL file", fix: str = _JSONL_FIX) -> list[str]:
    """The files a path or glob names, sorted; FileNotFoundError saying ``fix`` when there are none."""
    path = Path(pattern).expanduser()
    files = sorted(glob.glob(str(path))) if any(c in pattern for c in "*?[") else ([str(path)] if path.is_file() else [])
    if not files:
        raise FileNotFoundError(f"no {what} matches {pattern!r}: {fix}")
    return files


def read_lines(pattern: str, what: str = "JSONL file", fix: str = _JSONL_FIX) -> Iterator[tuple[str, str]]:
    """(``file:line``, line) for every non-blank line of the matching files, in file order."""
    for name in jsonl_files(pattern, what, fix):
        with open(name, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield f"{name}:{lineno}", line


def read_jsonl(pattern: str, fix: str = _JSONL_FIX) -> Iterator[tuple[str, dict[str, Any]]]:
    """(``file:line``, record) for every non-blank line of the matching files, in file order."""
    for where, line in read_lines(pattern, "JSONL file", fix):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        yield where, record


def _text(record: dict[str, Any], key: str, where: str, nonempty: bool) -> str:
    if key not in record:
        raise DataError(f"{where}: missing field {key!r} (has {', '.join(map(repr, record)) or 'no fields'})")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    if nonempty and not value.strip():
        raise DataError(f"{where}: field {key!r} is empty: every example needs a non-empty {key}")
    return value


def sft_spans(record: dict[str, Any], where: str) -> list[tuple[str, bool]]:
    """(text, trained) pieces of one SFT record; contiguous prompt text is already joined."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        spans: list[tuple[str, bool]] = []
        prompt = ""
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise DataError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
            role = _text(m, "role", f"{where}: messages[{i}]", True)
            if role not in ROLE_HEADERS:
                raise DataError(f"{where}: messages[{i}] has role {role!r}: use system, user or assistant")
            content = _text(m, "content", f"{where}: messages[{i}]", role == "assistant")
            if role == "assistant":
                spans += [(prompt + ROLE_HEADERS[role], False), (content, True)]
                prompt = "\n"
            else:
                prompt += f"{ROLE_HEADERS[role]}{content}\n"
        if not any(trained for _, trained in spans):
            raise DataError(f"{where}: the conversation has no assistant message to learn from")
        return spans
    if "prompt" not in record and "response" not in record:
        raise DataError(f"{where}: expected 'prompt' and 'response' fields, or 'messages'")
    return [(_text(record, "prompt", where, False), False), (_text(record, "response", where, True), True)]


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
    prompt_len = trained.index(1) if 1 in trained else len(trained)
    tok = np.asarray(tokens, np.int32)
    mask = np.asarray(trained[1:], np.int32)  # target t is token t+1: counted when that token is trained
    return Example(tok[:-1], tok[1:], mask, where), prompt_len


def _fits(example: Example, prompt_len: int, seq_len: int, overlong: str, what: str) -> bool:
    if len(example) <= seq_len:
        return True
    if overlong == "skip":
        return False
    part = (f"its prompt alone has {prompt_len} tokens" if prompt_len >= seq_len
            else f"prompt {prompt_len} + response {len(example) + 1 - prompt_len} tokens")
    raise DataError(f"{example.where}: {what} has {len(example)} tokens ({part}), more than data.seq_len={seq_len}: "
                    "shorten it, raise data.seq_len, or set finetune.overlong=skip to leave such examples out")


def load_sft(pattern: str, encode: Callable[[str], list[int]], *, bos_id: int, eos_id: int, seq_len: int,
             overlong: str = "error") -> ExampleSet:
    """Every SFT example of the matching JSONL files, validated and tokenized, in file order."""
    out = ExampleSet([], files=jsonl_files(pattern))
    for where, record in read_jsonl(pattern):
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
             overlong: str = "error") -> ExampleSet:
    """Every (chosen, rejected) pair of the matching JSONL files, as two Examples sharing the prompt."""
    out = ExampleSet([], files=jsonl_files(pattern))
    for where, record in read_jsonl(pattern):
        prompt = _text(record, "prompt", where, False)
        pair, ok = [], True
        for key in ("chosen", "rejected"):
            example, prompt_len = encode_spans([(prompt, False), (_text(record, key, where, True), True)], encode,
                                               bos_id, eos_id, where)
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


_LM_FIELDS = {"inputs": "inputs", "targets": "targets", "loss_mask": "loss_mask"}


def _rows_to_batch(rows: Sequence[Sequence[Any]], seq_len: int, batch_size: int,
                   fields: dict[str, str] | None = None, prefix: str = "") -> dict[str, np.ndarray]:
    """Rows of whole examples -> the batch contract; examples are segments 1, 2, ...; padding is 0.

    ``fields`` maps batch keys to the example attributes laid out along the row (default: an
    :class:`Example`'s inputs, targets and loss_mask; the first attribute's length is the example's);
    the segment ids and positions go to ``prefix + "segment_ids"`` and ``prefix + "positions"``.
    """
    fields = fields or _LM_FIELDS
    seg, pos = prefix + "segment_ids", prefix + "positions"
    batch = {k: np.zeros((batch_size, seq_len), np.int32) for k in (*fields, seg, pos)}
    for r, row in enumerate(rows):
        start = 0
        for s, ex in enumerate(row, 1):
            values = [(key, getattr(ex, attr)) for key, attr in fields.items()]
            end = start + len(values[0][1])
            for key, value in values:
                batch[key][r, start:end] = value
            batch[seg][r, start:end] = s
            batch[pos][r, start:end] = np.arange(end - start)
            start = end
    return batch


class _OrderedIterator:
    """Walks items in a seeded permutation per epoch (or file order when not shuffled), forever.

    State ``{"epoch", "next", "examples"}``: the epoch and index (in that epoch's order) of the next
    item not yet in any batch; ``examples`` guards against resuming with different data.
    """

    def __init__(self, items: Sequence[Any], seed: int, shuffle: bool):
        self.items, self.seed, self.shuffle = items, seed, shuffle
        self.epoch, self.next = 0, 0
        self._order_epoch, self._order = -1, None

    def _current(self) -> Any:
        if self._order_epoch != self.epoch:
            n = len(self.items)
            self._order = (np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle
                           else np.arange(n))
            self._order_epoch = self.epoch
        return self.items[int(self._order[self.next])]

    def _advance(self) -> None:
        self.next += 1
        if self.next == len(self.items):
            self.epoch, self.next = self.epoch + 1, 0

    def __iter__(self):
        return self

    def get_state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "next": self.next, "examples": len(self.items)}

    def set_state(self, state: dict[str, Any]) -> None:
        if int(state["examples"]) != len(self.items):
            raise ValueError(f"the saved data position is for {state['examples']} examples, the data now has "
                             f"{len(self.items)}: resume with the same finetune.train_path or use a new run_dir")
        self.epoch, self.next = int(state["epoch"]), int(state["next"])


def shard(items: Sequence[Any], shard_index: int, shard_count: int) -> Sequence[Any]:
    """``items[shard_index::shard_count]``: this process's share of an evaluation set."""
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} is not in [0, shard_count={shard_count}): "
                         "pass the process index and process count")
    return items[shard_index::shard_count]


class _PackingIterator(_OrderedIterator):
    """Endless batches of ``batch_size`` rows, whole items packed first-come into rows.

    An item has a size in each of ``limits`` (``_sizes``); a row is closed when the next item does
    not fit in one of them, so no item is ever split. Subclasses turn rows into arrays (``_batch``).
    """

    def __init__(self, items: Sequence[Any], *, limits: tuple[int, ...], batch_size: int, seed: int,
                 shuffle: bool):
        super().__init__(items, seed, shuffle)
        self.limits, self.batch_size = tuple(limits), batch_size

    def _sizes(self, item: Any) -> tuple[int, ...]:
        return (len(item),)

    def _batch(self, rows: list[list[Any]]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _rows(self, one_pass: bool = False) -> list[list[Any]]:
        """The next batch's rows; with ``one_pass``, fewer when this epoch ends first."""
        if not len(self.items):
            raise ValueError("there are no examples to make batches of")
        rows: list[list[Any]] = [[]]
        used = (0,) * len(self.limits)
        epoch = self.epoch
        while not (one_pass and self.epoch != epoch):
            item = self._current()
            sizes = self._sizes(item)
            if any(u + n > limit for u, n, limit in zip(used, sizes, self.limits)):
                if len(rows) == self.batch_size:
                    break
                rows.append([])
                used = (0,) * len(self.limits)
            rows[-1].append(item)
            used = tuple(u + n for u, n in zip(used, sizes))
            self._advance()
        return rows

    def __next__(self) -> dict[str, np.ndarray]:
        return self._batch(self._rows())

    def one_pass(self, max_batches: int = 0) -> list[dict[str, np.ndarray]]:
        """The batches from here to the end of the current epoch (at most ``max_batches``, 0 = all),
        the last one padded with empty rows; no batches when there are no items."""
        batches: list[dict[str, np.ndarray]] = []
        epoch = self.epoch
        while len(self.items) and self.epoch == epoch and not (max_batches and len(batches) >= max_batches):
            batches.append(self._batch(self._rows(one_pass=True)))
        return batches


class PackedSFTIterator(_PackingIterator):
    """Endless SFT batches [batch_size, seq_len]: whole examples packed first-come into rows."""

    def __init__(self, examples: Sequence[Example], *, seq_len: int, batch_size: int, seed: int,
                 shuffle: bool = True):
        super().__init__(examples, limits=(seq_len,), batch_size=batch_size, seed=seed, shuffle=shuffle)
        self.seq_len = seq_len

    def _batch(self, rows: list[list[Example]]) -> dict[str, np.ndarray]:
        return _rows_to_batch(rows, self.seq_len, self.batch_size)


class DPOIterator(_OrderedIterator):
    """Endless DPO batches: batch_size // 2 pairs, chosen in even rows, rejected in the odd row after."""

    def __init__(self, pairs: Sequence[tuple[Example, Example]], *, seq_len: int, batch_size: int, seed: int,
                 shuffle: bool = True):
        if batch_size % 2:
            raise ValueError(f"train.batch_size={batch_size} must be even for DPO: each pair takes two rows")
        super().__init__(pairs, seed, shuffle)
        self.seq_len, self.batch_size = seq_len, batch_size

    def __next__(self) -> dict[str, np.ndarray]:
        rows = []
        for _ in range(self.batch_size // 2):
            chosen, rejected = self._current()
            rows += [[chosen], [rejected]]
            self._advance()
        return _rows_to_batch(rows, self.seq_len, self.batch_size)


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
            batches.append(_rows_to_batch(rows[:batch_size], seq_len, batch_size))
            rows = rows[batch_size:]
        if max_batches and len(batches) >= max_batches:
            return batches[:max_batches]
    if rows:
        batches.append(_rows_to_batch(rows, seq_len, batch_size))
    return batches[:max_batches] if max_batches else batches
