"""The OpenAI-compatible HTTP API (FastAPI + uvicorn): ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``.

``model`` only ever names a target registered at start (``base``, an adapter, ``auto``): nothing in a
request reaches the file system.  Every answer that is not a success is in OpenAI's error shape.  Each
response carries ``mergekit_lora: {"adapters": [...]}`` (and the header ``x-mergekit-lora-adapters`` when
not streamed): the adapters that produced it.  uvicorn's graceful shutdown (SIGTERM) lets in-flight
requests finish; the batcher stops after them.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import LoraMergeError
from .batcher import Batcher, Busy, Job
from .decode import Row
from .engine import Engine
from .schema import ApiError, ChatRequest, CompletionRequest, check_chat, check_completion, sampling


@dataclass
class Limits:
    max_tokens: int = 1024  # the largest max_tokens a request may ask for
    default_max_tokens: int = 16  # OpenAI's default for /v1/completions
    max_request_bytes: int = 1_000_000
    max_batch: int = 8
    window_ms: float = 5.0
    max_queue: int = 1024


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def _read_json(request: Request, limit: int) -> dict[str, Any]:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"the request body is over {limit} bytes", code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the request body is over {limit} bytes", code="request_too_large")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return data


def _validated(cls: type, data: dict[str, Any]) -> Any:
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(x) for x in err["loc"] if not str(x).startswith(("str", "list", "int")))
        raise ApiError(400, f"{param or 'body'}: {err['msg']}", param=param or None, code="invalid_value") from None


def create_app(engine: Engine, *, api_key: str | None = None, limits: Limits | None = None) -> FastAPI:
    lim = limits or Limits()
    batcher = Batcher(engine, max_batch=lim.max_batch, window_s=lim.window_ms / 1000, max_queue=lim.max_queue)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="loramerge serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher

    @app.exception_handler(ApiError)
    async def _api_error(_r: Request, e: ApiError) -> JSONResponse:
        return _error(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_r: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error(ApiError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None))

    @app.middleware("http")
    async def _auth(request: Request, call_next: Any) -> Any:
        if api_key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return _error(ApiError(401, "Incorrect API key provided; send it as 'Authorization: Bearer KEY'",
                                       code="invalid_api_key"))
        return await call_next(request)

    def target(name: str) -> str:
        try:
            return engine.target(name).name
        except KeyError:
            raise ApiError(404, f"The model '{name}' does not exist; this server has: {', '.join(engine.names())}",
                           param="model", code="model_not_found") from None

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "batches": batcher.batches, "rows": batcher.rows, "largest_batch": batcher.largest,
                "queued": batcher.pending()}

    def model_card(name: str) -> dict[str, Any]:
        t = engine.target(name)
        return {"id": name, "object": "model", "created": 0, "owned_by": "mergekit-lora",
                "mergekit_lora": {"kind": t.kind, "base": engine.base_name}}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(n) for n in engine.names()]}

    @app.get("/v1/models/{name}")
    async def model(name: str) -> dict[str, Any]:
        return model_card(target(name))

    async def run(request: Request, chat: bool) -> Any:
        data = await _read_json(request, lim.max_request_bytes)
        req = _validated(ChatRequest if chat else CompletionRequest, data)
        name = target(req.model)
        sampling(req, default_max=1, limit=lim.max_tokens)  # parameters are checked before the prompt is read
        try:
            if chat:
                ids = engine.encode_chat(check_chat(req))
            else:
                check_completion(req)
                p = req.prompt
                if isinstance(p, list) and p and isinstance(p[0], int):
                    if any(not 0 <= t < len(engine.tokenizer) for t in p):
                        raise ApiError(400, "prompt: a token id is outside the vocabulary", param="prompt")
                    ids = list(p)
                else:
                    ids = engine.encode(p[0] if isinstance(p, list) else p) if p else []
            if not ids:
                raise ApiError(400, "the prompt is empty", param="messages" if chat else "prompt",
                               code="invalid_value")
            # chat without max_tokens: up to the context (OpenAI's default); completions: 16
            room = max(1, min(lim.max_tokens, engine.context - len(ids)))
            params = sampling(req, default_max=room if chat else lim.default_max_tokens, limit=lim.max_tokens)
            engine.check_context(len(ids), params.max_tokens)
        except LoraMergeError as e:
            raise ApiError(400, str(e), param="messages" if chat else "prompt",
                           code="context_length_exceeded" if "context length" in str(e) else "invalid_value") from None
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        def sink(ev: tuple[str, Any]) -> None:  # called from the batcher's thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, ev)
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening any more
                job.cancelled = True

        job = Job(name, ids, params, sink, stream=bool(req.stream))
        try:
            batcher.submit(job)
        except Busy as e:
            raise ApiError(503, str(e), type="server_error", code="overloaded") from None
        meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": req.model}
        if req.stream:
            usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(_stream(job, events, meta, chat, usage, len(ids)), media_type="text/event-stream",
                                     headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
        adapters: list[str] = []
        while True:
            kind, value = await events.get()
            if kind == "adapters":
                adapters = value
            elif kind == "error":
                raise ApiError(500, value, type="server_error", code="internal_error")
            elif kind == "done":
                body = _final(value, meta, chat, adapters, len(ids))
                return JSONResponse(body, headers={"x-mergekit-lora-adapters": ",".join(adapters)})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await run(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await run(request, chat=True)

    return app


def _usage(n_prompt: int, row: Row) -> dict[str, int]:
    return {"prompt_tokens": n_prompt, "completion_tokens": len(row.tokens), "total_tokens": n_prompt + len(row.tokens)}


def _final(row: Row, meta: dict[str, Any], chat: bool, adapters: list[str], n_prompt: int) -> dict[str, Any]:
    reason = row.finish_reason if row.finish_reason in ("stop", "length") else "stop"
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": row.text}, "finish_reason": reason,
                  "logprobs": None}
    else:
        choice = {"index": 0, "text": row.text, "finish_reason": reason, "logprobs": None}
    return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
            "usage": _usage(n_prompt, row), "system_fingerprint": None, "mergekit_lora": {"adapters": adapters}}


def _chunk(meta: dict[str, Any], chat: bool, adapters: list[str], *, text: str | None = None,
           role: bool = False, reason: str | None = None) -> str:
    if chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}
    body = {**meta, "object": "chat.completion.chunk" if chat else "text_completion", "choices": [choice],
            "system_fingerprint": None, "mergekit_lora": {"adapters": adapters}}
    return f"data: {json.dumps(body)}\n\n"


async def _stream(job: Job, events: asyncio.Queue, meta: dict[str, Any], chat: bool, usage: bool,
                  n_prompt: int) -> AsyncIterator[str]:
    adapters: list[str] = []
    try:
        while True:
            kind, value = await events.get()
            if kind == "adapters":
                adapters = value
                if chat:
                    yield _chunk(meta, chat, adapters, role=True)
            elif kind == "text":
                yield _chunk(meta, chat, adapters, text=value)
            elif kind == "error":
                err = ApiError(500, value, type="server_error", code="internal_error")
                yield f"data: {json.dumps(err.body())}\n\n"
                break
            elif kind == "done":
                reason = value.finish_reason if value.finish_reason in ("stop", "length") else "stop"
                yield _chunk(meta, chat, adapters, reason=reason)
                if usage:
                    body = {**meta, "object": "chat.completion.chunk" if chat else "text_completion", "choices": [],
                            "usage": _usage(n_prompt, value), "mergekit_lora": {"adapters": adapters}}
                    yield f"data: {json.dumps(body)}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled = True  # the client went away (or we are done): stop generating for it


def serve(engine: Engine, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          limits: Limits | None = None, log_level: str = "info", graceful_s: float = 60.0) -> None:
    """Run uvicorn until SIGINT/SIGTERM; in-flight requests finish first (up to ``graceful_s``)."""
    import uvicorn

    app = create_app(engine, api_key=api_key, limits=limits)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=graceful_s,
                            server_header=False)
    uvicorn.Server(config).run()
