"""``qkv serve``: an OpenAI-compatible HTTP API over the continuous-batching engine (inference/engine.py).

Endpoints: ``GET /v1/models``, ``POST /v1/completions`` (text or token-id prompts, ``echo``, ``logprobs``),
``POST /v1/chat/completions`` (the checkpoint's own chat template, ``logprobs``/``top_logprobs``), both with
``stream`` (server-sent events), ``stop``, ``max_tokens``, ``temperature``, ``top_p``, ``top_k``, ``seed``, ``n``;
``GET /health`` (slots busy/free, requests waiting). Errors are OpenAI error objects
``{"error": {"message", "type", "param", "code"}}``: 400 a bad request (malformed JSON, a field of the wrong
type or range, a prompt the context cannot hold), 401 a missing or wrong API key, 404 another model's name,
413 a body over 8 MiB, 429 every slot busy and the waiting line full, 503 shutting down. docs/serving.md.
"""
from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Literal

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qkv.api import LanguageModel
from qkv.data.chat_template import TemplateError
from qkv.errors import UserError
from qkv.inference.engine import Busy, Draining, Engine, Request, Token

MAX_BODY = 8 * 2**20


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


class _Sampling(BaseModel):
    """Fields both endpoints take; JSON types are checked strictly (``"5"`` is not a number), unknown fields
    are ignored as OpenAI's own clients send some (``user``, ``frequency_penalty`` at 0)."""

    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None


class CompletionBody(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatBody(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None


class Outbox:
    """Hands items from the engine thread to queues on the event loop: ``put`` collects them, ``send`` (the
    engine's ``after_step``, once a round's tokens are all out) wakes the loop once for all of them, so the
    interpreter lock changes hands once a step, while the next step computes, not once a token."""

    def __init__(self):
        self.loop: asyncio.AbstractEventLoop | None = None
        self.items, self.lock, self.scheduled = [], threading.Lock(), False

    def put(self, queue: asyncio.Queue, item: tuple) -> None:
        with self.lock:
            self.items.append((queue, item))

    def send(self) -> None:
        with self.lock:
            if self.scheduled or not self.items or self.loop is None:
                return
            self.scheduled = True
        try:
            self.loop.call_soon_threadsafe(self.flush)
        except RuntimeError:  # the event loop closed (the server is gone): nobody is listening
            pass

    def flush(self) -> None:
        with self.lock:
            items, self.items, self.scheduled = self.items, [], False
        for queue, item in items:
            queue.put_nowait(item)


@dataclass
class Choice:
    """One generated choice: text pieces go to ``queue`` (on the server's event loop) as the engine produces
    tokens; a stop string ends it (the text before the stop is kept), text that may begin a stop string or an
    incomplete UTF-8 character is held back until the next token settles it."""

    index: int
    lm: LanguageModel
    stops: list[str]
    outbox: Outbox
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    ids: list[int] = field(default_factory=list)
    tokens: list[Token] = field(default_factory=list)
    sent: str = ""
    stopped: bool = False
    prompt_tokens: list[Token] | None = None
    streamed: bool = True  # False: no stream and no stop strings, so the text is decoded once, at the end

    def _put(self, item: tuple) -> None:
        self.outbox.put(self.queue, item)

    def on_token(self, token: Token) -> bool:  # the engine thread
        self.ids.append(token.id)
        self.tokens.append(token)
        if not self.streamed:
            return False
        text = self.lm.tokenizer.decode(self.ids)
        cut = min((i for i in (text.find(s, max(0, len(self.sent) - len(s))) for s in self.stops) if i >= 0),
                  default=-1)
        if cut >= 0:
            self.stopped = True
            self._put(("text", text[len(self.sent):cut], len(self.tokens)))
            self.sent = text[:cut]
            return True
        safe = text.rstrip("\ufffd")
        held = max((k for s in self.stops for k in range(1, len(s)) if safe.endswith(s[:k])), default=0)
        safe = safe[:len(safe) - held]
        if len(safe) > len(self.sent) and safe.startswith(self.sent):
            self._put(("text", safe[len(self.sent):], len(self.tokens)))
            self.sent = safe
        return False

    def on_done(self, reason: str) -> None:  # the engine thread
        if not self.stopped and reason in ("stop", "length"):
            rest = self.lm.tokenizer.decode(self.ids)[len(self.sent):]
            if rest:
                self._put(("text", rest, len(self.tokens)))
                self.sent += rest
        self._put(("done", reason, len(self.tokens)))

    def on_prompt(self, tokens: list[Token]) -> None:
        self.prompt_tokens = tokens


def _bearer(request: HTTPRequest) -> str | None:
    value = request.headers.get("authorization", "")
    return value[7:].strip() if value.lower().startswith("bearer ") else None


class Server:
    """The HTTP side: request checking, one engine request per choice, OpenAI-shaped replies."""

    def __init__(self, lm: LanguageModel, engine: Engine, name: str, outbox: Outbox, api_key: str | None = None):
        if lm.tokenizer is None:
            raise UserError("this checkpoint has no tokenizer: convert it again with --tokenizer PATH")
        self.lm, self.engine, self.name, self.outbox, self.api_key = lm, engine, name, outbox, api_key
        self.created = int(time.time())

    def app(self) -> FastAPI:
        app = FastAPI(title="qkv", docs_url=None, redoc_url=None)

        @app.middleware("http")
        async def guard(request: HTTPRequest, call_next):
            if self.api_key and request.url.path.startswith("/v1/") and not secrets.compare_digest(
                    _bearer(request) or "", self.api_key):
                return APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY' with "
                                "the key qkv serve was started with", code="invalid_api_key").response()
            try:
                return await call_next(request)
            except APIError as err:
                return err.response()

        @app.get("/health")
        async def health():
            return {"status": "draining" if self.engine.draining else "ok", **self.engine.stats()}

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": self.name, "object": "model", "created": self.created,
                                                "owned_by": "qkv", "max_model_len": self.engine.context}]}

        @app.post("/v1/completions")
        async def completions(request: HTTPRequest):
            return await self._handle(request, CompletionBody, self._completion_prompts, "text_completion")

        @app.post("/v1/chat/completions")
        async def chat_completions(request: HTTPRequest):
            return await self._handle(request, ChatBody, self._chat_prompts, "chat.completion")

        return app

    # -- reading a request ---------------------------------------------------------------------------------------

    async def _body(self, request: HTTPRequest, model: type[BaseModel]) -> Any:
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise APIError(413, f"the request body has {len(raw)} bytes, more than the {MAX_BODY} this server "
                           "reads: send fewer or shorter prompts per request", code="request_too_large")
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as err:
            raise APIError(400, f"the request body is not valid JSON ({err}): send a JSON object",
                           code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        try:
            body = model.model_validate(data)
        except ValidationError as err:
            first = err.errors()[0]
            param = ".".join(str(p) for p in first["loc"])
            raise APIError(400, f"{param}: {first['msg']} (got {json.dumps(first.get('input'))[:80]})",
                           param=param, code="invalid_value") from None
        if body.model not in (None, self.name):
            raise APIError(404, f"the model {body.model!r} is not served here: this server serves {self.name!r}",
                           param="model", code="model_not_found")
        return body

    def _completion_prompts(self, body: CompletionBody) -> list[tuple[list[int], str]]:
        """(ids, text to echo) per prompt: text gets the tokenizer's bos first, token ids are taken as given."""
        prompt = body.prompt
        rows = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else list(prompt)
        if not rows:
            raise APIError(400, "prompt is empty: give a string, a list of strings or token ids", param="prompt")
        out = []
        for row in rows:
            if isinstance(row, str):
                if not row:
                    raise APIError(400, "prompt is an empty string: give at least one character", param="prompt")
                out.append((self.lm.prompt_ids([row])[0], row))
            else:
                out.append(([int(t) for t in row], self.lm.tokenizer.decode(row)))
        return out

    def _chat_prompts(self, body: ChatBody) -> list[tuple[list[int], str]]:
        messages = []
        for m in body.messages:
            content = m.content
            if isinstance(content, list):  # content parts: the text ones, in order
                content = "".join(str(p.get("text", "")) for p in content if p.get("type") == "text")
            messages.append({**(m.model_extra or {}), "role": m.role, "content": content or ""})
        kwargs = {"tools": body.tools} if body.tools else {}
        try:
            ids = self.lm.chat_prompt_ids(messages, check=False, **kwargs)
        except (TemplateError, UserError) as err:
            raise APIError(400, f"the chat template refuses these messages: {err}", param="messages") from None
        return [(ids, "")]

    # -- answering -------------------------------------------------------------------------------------------------

    async def _handle(self, request: HTTPRequest, model: type[BaseModel], prompts_of, kind: str):
        body = await self._body(request, model)
        prompts = prompts_of(body)
        chat = kind == "chat.completion"
        max_tokens = (body.max_completion_tokens or body.max_tokens or self.engine.context) if chat else body.max_tokens
        top_n = (body.top_logprobs or 0) if chat else (body.logprobs or 0)
        wants_logprobs = body.logprobs if chat else body.logprobs is not None
        stops = [body.stop] if isinstance(body.stop, str) else [s for s in (body.stop or []) if s]
        seed = body.seed if body.seed is not None else secrets.randbits(32)
        self.outbox.loop = asyncio.get_running_loop()
        choices, requests = [], []
        for p, (ids, _) in enumerate(prompts):
            for i in range(body.n):
                choice = Choice(len(choices), self.lm, stops, self.outbox, streamed=bool(body.stream or stops))
                requests.append(Request(ids, max_tokens, choice.on_token, choice.on_done,
                                        temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                                        seed=(seed + i) % 2**32, stop_ids=tuple(self.lm.stop_ids),
                                        top_n=max(top_n, 1) if wants_logprobs else 0,
                                        prompt_logprobs=bool(not chat and body.echo and wants_logprobs),
                                        on_prompt=choice.on_prompt))
                choices.append(choice)
        try:
            for r in requests:
                self.engine.check(r.prompt, r.max_tokens)
        except UserError as err:
            raise APIError(400, str(err), param="messages" if chat else "prompt",
                           code="context_length_exceeded") from None
        try:
            for r in requests:
                self.engine.submit(r)
        except Busy as err:
            for r in requests:
                r.cancel()
            raise APIError(429, f"{err}: retry later", code="server_busy", kind="rate_limit_error") from None
        except Draining as err:
            for r in requests:
                r.cancel()
            raise APIError(503, f"{err}: send the request to another replica", code="shutting_down",
                           kind="server_error") from None
        meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}", "created": int(time.time()),
                "model": self.name}
        shaper = _Shapes(self, body, prompts, chat, top_n)
        if body.stream:
            return StreamingResponse(self._events(request, choices, requests, meta, shaper),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await self._whole(request, choices, requests, meta, shaper)

    async def _whole(self, request, choices, requests, meta, shaper):
        async def collect():
            results = []
            for choice in choices:
                text, reason = "", None
                while reason is None:
                    what, value, _ = await choice.queue.get()
                    text, reason = (text + value, None) if what == "text" else (text, value)
                results.append((text, reason))
            return results

        work = asyncio.ensure_future(collect())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not work.done():  # the client went away: its slots are freed at once
            work.cancel()
            for r in requests:
                r.cancel()
            return JSONResponse({}, status_code=499)
        results = work.result()
        if any(reason.startswith("error") for _, reason in results):
            raise APIError(500, f"internal error in the decoding engine ({results[0][1]}): a bug in qkv, "
                           "please report it", kind="server_error")
        return JSONResponse({**meta, "object": shaper.kind, "choices": [
            shaper.choice(c, text, reason) for c, (text, reason) in zip(choices, results)],
            "usage": shaper.usage(choices)})

    async def _events(self, request, choices, requests, meta, shaper) -> AsyncIterator[str]:
        """Server-sent events: one chunk per text piece of any choice, a last chunk per choice with its
        finish_reason, then ``data: [DONE]``."""
        merged: asyncio.Queue = asyncio.Queue()
        readers = [asyncio.ensure_future(_forward(c, merged)) for c in choices]
        shown = [0] * len(choices)
        try:
            if shaper.chat:
                for c in choices:
                    yield _sse({**meta, "object": "chat.completion.chunk",
                                "choices": [shaper.delta(c, {"role": "assistant", "content": ""}, None, 0, 0)]})
            elif shaper.echo:
                for c in choices:
                    yield _sse({**meta, "object": "text_completion", "choices": [shaper.echo_chunk(c)]})
            left = len(choices)
            while left:
                choice, what, value, n_tokens = await merged.get()
                if what == "done":
                    left -= 1
                    if value.startswith("error"):
                        yield _sse({"error": {"message": f"internal error in the decoding engine ({value})",
                                              "type": "server_error", "param": None, "code": None}})
                        continue
                    reason = value if value in ("stop", "length") else "stop"
                    payload = {"content": ""} if shaper.chat else ""
                    yield _sse({**meta, "object": shaper.chunk_kind,
                                "choices": [shaper.delta(choice, payload, reason, shown[choice.index], n_tokens)]})
                    shown[choice.index] = n_tokens
                    continue
                payload = {"content": value} if shaper.chat else value
                yield _sse({**meta, "object": shaper.chunk_kind,
                            "choices": [shaper.delta(choice, payload, None, shown[choice.index], n_tokens)]})
                shown[choice.index] = n_tokens
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or the stream ended): free every slot still decoding for it
            for r in requests:
                r.cancel()
            for task in readers:
                task.cancel()


async def _forward(choice: Choice, merged: asyncio.Queue) -> None:
    while True:
        what, value, n = await choice.queue.get()
        await merged.put((choice, what, value, n))
        if what == "done":
            return


async def _disconnected(request: HTTPRequest) -> None:
    """Returns when the client closes the connection (the body has been read: what comes next is the end)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class _Shapes:
    """OpenAI's reply shapes for one request: whole choices, stream deltas, log-probabilities, usage."""

    def __init__(self, server: Server, body: Any, prompts: list[tuple[list[int], str]], chat: bool, top_n: int):
        self.server, self.body, self.prompts, self.chat, self.top_n = server, body, prompts, chat, top_n
        self.tok = server.lm.tokenizer
        self.kind = "chat.completion" if chat else "text_completion"
        self.chunk_kind = "chat.completion.chunk" if chat else "text_completion"
        self.echo = not chat and body.echo
        self.logprobs = body.logprobs if chat else body.logprobs is not None

    def _prompt(self, choice: Choice) -> tuple[list[int], str]:
        return self.prompts[choice.index // self.body.n]

    def piece(self, token_id: int) -> str:
        return self.tok.decode([token_id]) or self.tok.id_to_piece(token_id)

    def choice(self, c: Choice, text: str, reason: str) -> dict[str, Any]:
        reason = reason if reason in ("stop", "length") else "stop"
        if self.chat:
            return {"index": c.index, "message": {"role": "assistant", "content": text},
                    "logprobs": self.chat_logprobs(c.tokens) if self.logprobs else None, "finish_reason": reason}
        ids, echo_text = self._prompt(c)
        logprobs = None
        if self.logprobs:
            logprobs = self.completion_logprobs((ids, c.prompt_tokens) if self.echo else None, c.tokens)
        return {"index": c.index, "text": (echo_text if self.echo else "") + text, "logprobs": logprobs,
                "finish_reason": reason}

    def echo_chunk(self, c: Choice) -> dict[str, Any]:
        ids, echo_text = self._prompt(c)
        logprobs = self.completion_logprobs((ids, c.prompt_tokens), []) if self.logprobs else None
        return {"index": c.index, "text": echo_text, "logprobs": logprobs, "finish_reason": None}

    def delta(self, c: Choice, payload: Any, reason: str | None, start: int, end: int) -> dict[str, Any]:
        tokens = c.tokens[start:end]
        if self.chat:
            return {"index": c.index, "delta": payload, "finish_reason": reason,
                    "logprobs": self.chat_logprobs(tokens) if self.logprobs and tokens else None}
        logprobs = self.completion_logprobs(None, tokens) if self.logprobs and tokens else None
        return {"index": c.index, "text": payload, "logprobs": logprobs, "finish_reason": reason}

    def completion_logprobs(self, prompt: tuple[list[int], list[Token] | None] | None,
                            tokens: list[Token]) -> dict[str, Any]:
        """The legacy shape: tokens, token_logprobs, top_logprobs (a dict per token), text_offset; with echo
        the prompt's tokens first (the very first has no log-probability: null)."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        entries: list[tuple[int, Token | None]] = []
        offset = 0
        if prompt is not None:
            ids, scored = prompt
            entries += [(ids[0], None)] + [(t.id, t) for t in (scored or [])]
        entries += [(t.id, t) for t in tokens]
        for token_id, token in entries:
            piece = self.piece(token_id)
            out["tokens"].append(piece)
            out["token_logprobs"].append(None if token is None else token.logprob)
            top: dict[str, float] | None = None
            if token is not None:  # likeliest first; ids that read as the same text keep the likeliest's value
                top = {}
                for i, lp in (token.top or [])[:max(self.top_n, 1)]:
                    top.setdefault(self.piece(i), lp)
            out["top_logprobs"].append(top)
            out["text_offset"].append(offset)
            offset += len(piece)
        return out

    def chat_logprobs(self, tokens: list[Token]) -> dict[str, Any]:
        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            piece = self.piece(token_id)
            return {"token": piece, "logprob": logprob, "bytes": list(piece.encode("utf-8"))}

        return {"content": [{**entry(t.id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in
                                                                        (t.top or [])[:self.top_n]]}
                            for t in tokens]}

    def usage(self, choices: list[Choice]) -> dict[str, int]:
        prompt = sum(len(ids) for ids, _ in self.prompts)
        completion = sum(len(c.tokens) for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
