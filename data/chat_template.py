"""A model's own chat template: read from its Hugging Face files, rendered as transformers renders it,
tokenized with the special tokens it writes, and the assistant's tokens found exactly.

Reading (``read_template``): ``chat_template`` in ``tokenizer_config.json`` (a string, or a list of
``{"name", "template"}`` where ``default`` is used), else ``chat_template.jinja``, else
``chat_template.json``; ``tokenizer.chat_template=PATH.jinja`` overrides (``load_template_file``). A
model without one keeps qkv's plain format, written as a template of the same kind (``PLAIN_TEMPLATE``).

Rendering (``ChatTemplate.render``): jinja2's ``ImmutableSandboxedEnvironment`` with the settings and
helpers of transformers' ``apply_chat_template`` (``trim_blocks``, ``lstrip_blocks``, loop controls,
``raise_exception``, ``strftime_now``, a non-escaping ``tojson``, a guarded ``namespace`` and ``dict``,
``{% generation %}`` blocks) and the tokenizer's special-token strings (``bos_token``, ``eos_token``, ...)
as variables; template keyword arguments (``enable_thinking``: ``ChatTemplate.with_kwargs``, checked by
``check_template_kwargs``) as further variables. Messages are normalized as transformers normalizes them:
keys whose value is None dropped, ``reasoning_content`` / ``thinking`` / ``reasoning`` aliased.

Tokenizing (``encode_rendered``): the rendered text with its special-token spellings read as special
tokens, no bos/eos added (the template writes them), as transformers tokenizes it.

Assistant spans (``ChatTemplate.assistant_spans``): the character ranges ``{% generation %}`` blocks
wrote, where the template has them; otherwise the text each assistant turn adds, found by rendering
growing prefixes of the conversation (the prompt so far with the generation prompt, then with the turn),
ending after the turn's end-of-turn token (trailing whitespace is not trained). A template whose earlier
turns render differently once later turns follow (Qwen 3 drops earlier ``<think>`` blocks, Mistral moves
the system message to the last user turn) is refused for multi-turn records: the spans would not be
those of the whole text. A token is trained when its characters overlap a span (transformers' rule).
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from qkv.errors import UserError

# qkv's plain format as a template: "System: s\nUser: u\nAssistant: " + reply + eos, a newline between turns.
PLAIN_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- 'Assistant: ' }}{% generation %}{{- message['content'] + eos_token }}{% endgeneration %}"
    "{%- if not loop.last %}{{- '\\n' }}{%- endif %}"
    "{%- elif message['role'] in ['system', 'user'] %}"
    "{{- message['role'][0] | upper }}{{- message['role'][1:] + ': ' + message['content'] + '\\n' }}"
    "{%- else %}"
    "{{- raise_exception('messages[' ~ loop.index0 ~ '] has role \\'' ~ message['role']"
    " ~ '\\': use system, user or assistant') }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'Assistant: ' }}{%- endif %}"
)

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")

# Template keyword arguments: the names apply_chat_template sets itself, and the types of well-known ones.
RESERVED_KWARGS = ("messages", "tools", "documents", "add_generation_prompt")
KNOWN_KWARG_TYPES: dict[str, tuple[type, str]] = {
    "enable_thinking": (bool, "true or false"),
    "tools_in_user_message": (bool, "true or false"),
    "add_vision_id": (bool, "true or false"),
    "date_string": (str, "a string, e.g. '26 Jul 2024'"),
    "reasoning_effort": (str, "a string, e.g. 'low'"),
}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class TemplateError(UserError):
    """The template refused a conversation (raise_exception) or could not be rendered."""


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


@lru_cache(maxsize=16)
def _compile(source: str):
    """The template compiled in transformers' sandboxed environment (see module docstring)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class AssistantTracker(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}``: records the character span each block writes."""

        tags = {"generation"}

        def __init__(self, environment):
            super().__init__(environment)
            environment.extend(activate_tracker=self.activate_tracker)
            self._tracking = ContextVar("assistant_tracker", default=None)

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_generation_support"), [], [], body).set_lineno(lineno)

        @jinja2.pass_eval_context
        def _generation_support(self, context, caller) -> str:
            rv = caller()
            tracking = self._tracking.get()
            if tracking is not None:
                blocks, spans = tracking
                start = len("".join(blocks))
                spans.append((start, start + len(rv)))
            return rv

        @contextmanager
        def activate_tracker(self, blocks: list[str], spans: list[tuple[int, int]]):
            token = self._tracking.set((blocks, spans))
            try:
                yield
            finally:
                self._tracking.reset(token)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot store underscore names ({name!r})")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[AssistantTracker, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, dict=TemplateDict(),
                       namespace=TemplateNamespace)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as err:
        raise TemplateError(f"the chat template does not parse (line {err.lineno}: {err.message}): fix it or pass "
                            "another with tokenizer.chat_template=PATH.jinja") from None


def _json_value(x: Any) -> bool:
    if x is None or isinstance(x, (bool, str, int)):
        return True
    if isinstance(x, float):
        return x == x and x not in (float("inf"), float("-inf"))
    if isinstance(x, list):
        return all(_json_value(v) for v in x)
    if isinstance(x, dict):
        return all(isinstance(k, str) and _json_value(v) for k, v in x.items())
    return False


def check_template_kwargs(value: Any, where: str) -> dict[str, Any]:
    """Template keyword arguments (``{"enable_thinking": false}``) checked: a mapping of variable names to JSON
    values, none of the names apply_chat_template sets itself, well-known names with their type. Errors name
    ``where`` and the key."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{where} must be a mapping of template variables, e.g. {{enable_thinking: false}}, "
                        f"not {value!r}")
    for key, v in value.items():
        if not isinstance(key, str) or not _NAME.match(key):
            raise UserError(f"{where}: {key!r} is not a template variable name: use letters, digits and _")
        if key in RESERVED_KWARGS:
            raise UserError(f"{where}.{key}: set by qkv itself (messages, tools, documents, add_generation_prompt): "
                            "remove it")
        if not _json_value(v):
            raise UserError(f"{where}.{key}={v!r} must be a JSON value (true/false, a number, a string, a list "
                            "or a mapping)")
        known = KNOWN_KWARG_TYPES.get(key)
        if known and not isinstance(v, known[0]):
            raise UserError(f"{where}.{key}={v!r} must be {known[1]}")
    return dict(value)


@lru_cache(maxsize=16)
def _variables(source: str) -> frozenset[str]:
    """The variables a template reads without setting them (what keyword arguments can reach)."""
    import jinja2.meta

    compiled = _compile(source)
    return frozenset(jinja2.meta.find_undeclared_variables(compiled.environment.parse(source)))


def _normalized(message: Any) -> Any:
    """A message as transformers hands it to the template: keys whose value is None dropped, the reasoning
    under ``reasoning_content`` and ``thinking`` too when given under any of its names."""
    if not isinstance(message, dict):
        return message
    message = {k: v for k, v in message.items() if v is not None}
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


class ChatTemplate:
    """A Jinja chat template and the special-token strings it is rendered with."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None, origin: str = "the chat template",
                 kwargs: dict[str, Any] | None = None):
        if not isinstance(source, str) or not source.strip():
            raise UserError(f"{origin} is empty: pass a Jinja chat template (tokenizer.chat_template=PATH.jinja)")
        self.source, self.origin = source, origin
        self.special_tokens = dict(special_tokens or {})
        self.kwargs = dict(kwargs or {})
        self.has_generation = bool(_GENERATION_TAG.search(source))
        _compile(source)  # syntax errors now, not at the first record

    def with_kwargs(self, kwargs: Any, where: str = "template keyword arguments") -> "ChatTemplate":
        """This template rendered with ``kwargs`` too (checked by ``check_template_kwargs``; each must be a
        variable the template reads, so a misspelt or foreign one is an error, not silently ignored)."""
        kwargs = check_template_kwargs(kwargs, where)
        unread = sorted(set(kwargs) - _variables(self.source))
        if unread:
            reads = sorted(_variables(self.source) - {"messages", *RESERVED_KWARGS})
            raise UserError(f"{where}.{unread[0]}: {self.origin} does not read {unread[0]!r} (it reads "
                            f"{', '.join(reads) or 'no other variables'}): remove it or fix its name")
        return ChatTemplate(self.source, self.special_tokens, self.origin, {**self.kwargs, **kwargs})

    @property
    def is_plain(self) -> bool:
        return self.source == PLAIN_TEMPLATE

    def _render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool, track: bool,
                tools: Any = None, **kwargs: Any) -> tuple[str, list[tuple[int, int]]]:
        import jinja2

        compiled = _compile(self.source)
        variables = {**self.special_tokens, **self.kwargs, **kwargs}
        messages = [_normalized(m) for m in messages]
        try:
            if not track:
                return compiled.render(messages=messages, tools=tools, documents=None,
                                       add_generation_prompt=add_generation_prompt, **variables), []
            blocks: list[str] = []
            spans: list[tuple[int, int]] = []
            with compiled.environment.activate_tracker(blocks, spans):
                for block in compiled.generate(messages=messages, tools=tools, documents=None,
                                               add_generation_prompt=add_generation_prompt, **variables):
                    blocks.append(block)
            return "".join(blocks), spans
        except jinja2.exceptions.TemplateError as err:
            raise TemplateError(f"{self.origin} refused the conversation: {_first_line(err)}") from None
        except (TypeError, AttributeError, KeyError, IndexError, ValueError) as err:
            raise TemplateError(f"{self.origin} failed on the conversation ({type(err).__name__}: "
                                f"{_first_line(err)}): check the messages' fields") from None

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False, tools: Any = None,
               **kwargs: Any) -> str:
        """The text of the conversation, as ``apply_chat_template(..., tokenize=False)`` gives it."""
        return self._render(messages, add_generation_prompt, False, tools, **kwargs)[0]

    def assistant_spans(self, messages: Sequence[dict[str, Any]], tools: Any = None,
                        **kwargs: Any) -> tuple[str, list[tuple[int, int]]]:
        """(the whole text, the character spans of the assistant turns and their end-of-turn tokens)."""
        if self.has_generation:
            return self._render(messages, False, True, tools, **kwargs)
        whole = self.render(messages, tools=tools, **kwargs)
        turns = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"]
        single = sum(1 for m in messages if isinstance(m, dict) and m.get("role") != "system") <= 2
        spans = []
        for i in turns:
            before = self.render(messages[:i], add_generation_prompt=True, tools=tools, **kwargs) if i else ""
            upto = self.render(messages[: i + 1], tools=tools, **kwargs)
            if not (upto.startswith(before) and whole.startswith(upto)) and not (single and upto.startswith(before)):
                raise TemplateError(
                    f"{self.origin} renders earlier turns differently once later turns follow (it drops or moves "
                    f"text, as Qwen 3 drops earlier <think> blocks), so assistant turn messages[{i}] is not where "
                    "the prefix puts it: make the record single-turn, or use a template with {% generation %} "
                    "blocks (tokenizer.chat_template=PATH.jinja)")
            start, end = len(before), len(upto.rstrip())
            if end > start:
                spans.append((start, end))
        return whole, spans


def encode_rendered(tok: Any, text: str, cuts: Sequence[int] = ()) -> tuple[list[int], list[tuple[int, int]]]:
    """(ids, character offsets per id) of rendered template text, special-token spellings read as
    special tokens and nothing added. A Hugging Face tokenizer encodes the whole text, as transformers
    does; SentencePiece encodes the pieces between special tokens and ``cuts`` (span edges) one by one."""
    if hasattr(tok, "encode_with_offsets"):
        return tok.encode_with_offsets(text)
    specials = {tok.id_to_piece(i): i for i in {tok.bos_id, tok.eos_id, tok.pad_id} if i is not None}
    pattern = re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))
    edges = sorted({0, len(text), *[c for c in cuts if 0 < c < len(text)]})
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    for a, b in zip(edges, edges[1:]):
        pos = a
        for m in [*pattern.finditer(text, a, b), None]:
            stop = m.start() if m else b
            if stop > pos:
                piece = tok.encode(text[pos:stop])
                ids += piece
                offsets += [(pos, stop)] * len(piece)
            if m:
                ids.append(specials[m.group()])
                offsets.append((m.start(), m.end()))
                pos = m.end()
    return ids, offsets


def span_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """1 for every token whose characters overlap a span (spans and offsets in order), as transformers'
    ``return_assistant_tokens_mask``."""
    mask = [0] * len(offsets)
    k = 0
    for t, (start, end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if end > spans[k][0]:
            mask[t] = 1
    return mask


def special_token_strings(tok: Any) -> dict[str, str]:
    """bos_token / eos_token / pad_token / unk_token spellings of a qkv tokenizer, for the template."""
    out = {}
    for name in ("bos", "eos", "pad", "unk"):
        i = getattr(tok, f"{name}_id", None)
        if i is not None:
            out[f"{name}_token"] = tok.id_to_piece(i)
    return out


def special_id_set(tok: Any) -> set[int]:
    """The ids of the tokenizer's special tokens (added specials of a Hugging Face tokenizer; bos/eos/pad)."""
    ids = {i for i in (tok.bos_id, tok.eos_id, tok.pad_id) if i is not None}
    return ids | set(getattr(tok, "added_special_ids", lambda: set())())


def stop_ids(template: ChatTemplate, tok: Any, extra: Sequence[int] = ()) -> list[int]:
    """The ids that end an assistant turn: eos, the last token of a probe turn's trained span (the
    end-of-turn token, e.g. <|eot_id|>, <|im_end|>, <end_of_turn>) and ``extra`` (generation_config's)."""
    ids = [tok.eos_id, *[int(i) for i in extra]]
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    try:
        text, spans = template.assistant_spans(probe)
        tokens, offsets = encode_rendered(tok, text, [e for s in spans for e in s])
        mask = span_mask(offsets, spans)
        if 1 in mask:
            last = max(i for i, m in enumerate(mask) if m)
            if tokens[last] in special_id_set(tok):
                ids.append(tokens[last])
    except UserError:
        pass
    return sorted(set(i for i in ids if i is not None))


# ---------------------------------------------------------------------------------------------
# Reading and storing


def _from_config_value(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise UserError(f"{where}: chat_template is a list without a 'default' template: pass one with "
                        "tokenizer.chat_template=PATH.jinja")
    raise UserError(f"{where}: chat_template must be a string or a list of named templates")


def read_template(folder: str | Path) -> str | None:
    """The chat template a Hugging Face model/tokenizer directory ships, or None."""
    folder = Path(folder).expanduser()
    if folder.is_file():
        folder = folder.parent
    config = folder / "tokenizer_config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise UserError(f"{config} is not valid JSON ({_first_line(err)}): fix or remove it") from None
        found = _from_config_value(data.get("chat_template") if isinstance(data, dict) else None, str(config))
        if found:
            return found
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    side = folder / "chat_template.json"
    if side.is_file():
        try:
            data = json.loads(side.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise UserError(f"{side} is not valid JSON ({_first_line(err)}): fix or remove it") from None
        return _from_config_value(data.get("chat_template") if isinstance(data, dict) else data, str(side))
    return None


def load_template_file(path: str | Path) -> str:
    """``tokenizer.chat_template=PATH``: a .jinja file, or a Hugging Face directory / tokenizer_config.json."""
    p = Path(path).expanduser()
    if p.is_dir() or p.name.endswith(".json"):
        found = read_template(p if p.is_dir() else p.parent) if p.exists() else None
    else:
        found = p.read_text(encoding="utf-8") if p.is_file() else None
    if not found:
        raise UserError(f"tokenizer.chat_template={path!r} holds no chat template: pass a .jinja file or a Hugging "
                        "Face directory with one")
    return found


def template_for(meta: dict[str, Any], tok: Any, override: str | None = None, kwargs: dict[str, Any] | None = None,
                 where: str = "tokenizer.chat_template_kwargs") -> ChatTemplate:
    """The chat template of a checkpoint (its ``meta``), ``override`` (a path) first, else the plain one;
    rendered with ``kwargs`` (``tokenizer.chat_template_kwargs``, named ``where`` in errors)."""
    if override:
        template = ChatTemplate(load_template_file(override), special_token_strings(tok), f"chat template {override}")
    elif meta.get("chat_template"):
        template = ChatTemplate(meta["chat_template"], special_token_strings(tok), "the checkpoint's chat template")
    else:
        template = ChatTemplate(PLAIN_TEMPLATE, special_token_strings(tok), "qkv's plain chat template")
    return template.with_kwargs(kwargs, where) if kwargs else template
