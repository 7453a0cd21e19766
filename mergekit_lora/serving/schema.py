"""OpenAI request bodies (pydantic) and their checks; every refusal is an :class:`ApiError` (OpenAI's shape)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from .decode import Sampling

MAX_STOP = 4


class ApiError(Exception):
    """An answer in OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None
    user: str | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int]
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Common):
    messages: list[ChatMessage]
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None
    top_logprobs: int | None = None


def _unsupported(req: _Common, extra: dict[str, Any]) -> None:
    checks = {"n": req.n not in (None, 1), "presence_penalty": bool(req.presence_penalty),
              "frequency_penalty": bool(req.frequency_penalty), "logit_bias": bool(req.logit_bias),
              "logprobs": req.logprobs not in (None, False, 0), **extra}
    for name, bad in checks.items():
        if bad:
            raise ApiError(400, f"{name} is not supported by this server (leave it out or at its default)",
                           param=name, code="unsupported_parameter")


def sampling(req: _Common, *, default_max: int, limit: int) -> Sampling:
    """The checked generation parameters (OpenAI's defaults: temperature 1, top_p 1, max_tokens 16)."""
    max_tokens = req.max_completion_tokens if req.max_tokens is None else req.max_tokens
    max_tokens = default_max if max_tokens is None else max_tokens
    if not 1 <= max_tokens <= limit:
        raise ApiError(400, f"max_tokens must be between 1 and {limit} (got {max_tokens})", param="max_tokens",
                       code="invalid_value")
    temperature = 1.0 if req.temperature is None else float(req.temperature)
    if not 0.0 <= temperature <= 2.0:
        raise ApiError(400, f"temperature must be between 0 and 2 (got {temperature})", param="temperature",
                       code="invalid_value")
    top_p = 1.0 if req.top_p is None else float(req.top_p)
    if not 0.0 < top_p <= 1.0:
        raise ApiError(400, f"top_p must be in (0, 1] (got {top_p})", param="top_p", code="invalid_value")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP or any(not s or len(s) > 256 for s in stop):
        raise ApiError(400, f"stop takes up to {MAX_STOP} non-empty strings of at most 256 characters",
                       param="stop", code="invalid_value")
    if req.seed is not None and not 0 <= req.seed < 2**63:
        raise ApiError(400, "seed must be a non-negative integer below 2**63", param="seed", code="invalid_value")
    return Sampling(max_tokens=int(max_tokens), temperature=temperature, top_p=top_p, seed=req.seed,
                    stop=tuple(stop))


def check_completion(req: CompletionRequest) -> None:
    _unsupported(req, {"echo": bool(req.echo), "suffix": bool(req.suffix), "best_of": req.best_of not in (None, 1)})
    p = req.prompt
    if isinstance(p, list) and p and isinstance(p[0], str) and len(p) != 1:
        raise ApiError(400, f"one prompt per request (got {len(p)})", param="prompt", code="invalid_value")


def check_chat(req: ChatRequest) -> list[dict[str, str]]:
    """The messages as ``{"role", "content"}`` strings for the chat template."""
    _unsupported(req, {"tools": bool(req.tools), "top_logprobs": bool(req.top_logprobs),
                       "response_format": bool(req.response_format) and req.response_format.get("type") != "text"})
    if not req.messages:
        raise ApiError(400, "messages must hold at least one message", param="messages", code="invalid_value")
    out = []
    for i, m in enumerate(req.messages):
        if m.role not in ("system", "user", "assistant", "developer"):
            raise ApiError(400, f"messages[{i}].role must be system, user or assistant (got {m.role!r})",
                           param=f"messages[{i}].role", code="invalid_value")
        content = m.content or ""
        if isinstance(content, list):
            if any(part.get("type") != "text" for part in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported",
                               param=f"messages[{i}].content", code="invalid_value")
            content = "".join(str(part.get("text", "")) for part in content)
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return out
