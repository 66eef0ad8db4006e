"""OpenAI's request and error shapes, read into the shared engine's settings.

A request body is checked field by field here, before any model work: a field the gateway cannot
honour (``n > 1``, tools, images, ...) is refused with OpenAI's error object and a message that
says so, never silently ignored; a field of the wrong type or range likewise names the field.
Everything here is pure (no I/O, no model): the app calls it on the event loop.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ...shared.generation import GenerationSettings
from ...shared.sampling import SamplingSettings

MAX_TOP_LOGPROBS_CHAT = 20
"""OpenAI's bound on ``top_logprobs`` (chat)."""
MAX_LOGPROBS_COMPLETION = 5
"""OpenAI's bound on ``logprobs`` (completions)."""
MAX_STOP = 4
"""OpenAI's bound on stop strings."""


class ApiError(Exception):
    """An answer in OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``.

    Attributes:
        status: the HTTP status (400 for a bad request, 401 for a missing or wrong key, ...).
        message: what is wrong and what would be right.
        type: OpenAI's error type (``invalid_request_error``, ``authentication_error``, ...).
        param: the request field at fault, if one is.
        code: a short machine-readable code, if any.
    """

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str | None, message: str, code: str | None = "invalid_value") -> ApiError:
    """A 400 about ``param``."""
    return ApiError(400, message, param=param, code=code)


def unsupported(param: str, message: str) -> ApiError:
    """A 400 for a field this gateway cannot honour."""
    return ApiError(400, f"{message} (splitlm serve does not support it)", param=param, code="unsupported_parameter")


@dataclass(frozen=True)
class Defaults:
    """What a request that leaves a field out gets: ``splitlm serve``'s sampling flags."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None


@dataclass(frozen=True)
class ApiRequest:
    """One parsed request.

    Attributes:
        kind: ``chat`` (``/v1/chat/completions``) or ``completion`` (``/v1/completions``).
        model: the ``model`` the client named (echoed back).
        messages: the conversation (chat), roles and text only.
        prompt: the raw prompt (completion).
        settings: length, stop strings, sampling.
        stream: answer as server-sent events.
        include_usage: with ``stream``: a last chunk carrying ``usage``.
        logprobs: None for none; N for each token's log-probability and its N best alternatives.
    """

    kind: Literal["chat", "completion"]
    model: str
    settings: GenerationSettings
    messages: tuple[dict[str, str], ...] = ()
    prompt: str | None = None
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None


_IGNORED = ("user", "store", "metadata", "service_tier", "stream_options", "parallel_tool_calls")
"""Fields accepted without effect: they change nothing a reply contains (``stream_options`` is
read for ``include_usage``)."""
_COMMON = ("model", "stream", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n",
           "frequency_penalty", "presence_penalty", "logit_bias", "logprobs")
_CHAT = (*_COMMON, *_IGNORED, "messages", "max_completion_tokens", "top_logprobs", "response_format",
         "tools", "tool_choice", "functions", "function_call", "modalities", "audio", "prediction",
         "reasoning_effort", "web_search_options")
_COMPLETION = (*_COMMON, *_IGNORED, "prompt", "echo", "suffix", "best_of")
_SUPPORTED_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def parse_chat(body: object, defaults: Defaults) -> ApiRequest:
    """A ``/v1/chat/completions`` body.

    Raises:
        ApiError: 400 naming the field that is wrong or unsupported.
    """
    obj = _object(body, _CHAT)
    for key in ("tools", "functions", "tool_choice", "function_call"):
        if obj.get(key) not in (None, [], "none"):
            raise unsupported(key, f"{key!r}: tool and function calls are not supported")
    fmt = obj.get("response_format")
    if fmt is not None and not (isinstance(fmt, Mapping) and fmt.get("type") == "text"):
        raise unsupported("response_format", "'response_format' other than {\"type\": \"text\"}")
    if obj.get("modalities") not in (None, ["text"]):
        raise unsupported("modalities", "'modalities' other than [\"text\"]")
    for key in ("audio", "prediction", "reasoning_effort", "web_search_options"):
        if obj.get(key) is not None:
            raise unsupported(key, f"{key!r}")
    messages = _messages(obj.get("messages"))
    logprobs: int | None = None
    want = obj.get("logprobs")
    if want is not None and not isinstance(want, bool):
        raise bad("logprobs", f"'logprobs' must be true or false, got {want!r}", "invalid_type")
    top = obj.get("top_logprobs")
    if top is not None:
        top = _int(obj, "top_logprobs", 0, MAX_TOP_LOGPROBS_CHAT)
        if not want:
            raise bad("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    if want:
        logprobs = top or 0
    max_tokens = obj.get("max_completion_tokens", obj.get("max_tokens"))
    key = "max_completion_tokens" if "max_completion_tokens" in obj else "max_tokens"
    return ApiRequest(
        "chat", _model(obj), _settings(obj, defaults, key, max_tokens), messages=messages,
        stream=_stream(obj), include_usage=_include_usage(obj), logprobs=logprobs,
    )


def parse_completion(body: object, defaults: Defaults) -> ApiRequest:
    """A ``/v1/completions`` body (a single string prompt).

    Raises:
        ApiError: 400 naming the field that is wrong or unsupported.
    """
    obj = _object(body, _COMPLETION)
    if obj.get("echo"):
        raise unsupported("echo", "'echo': true")
    if obj.get("suffix") is not None:
        raise unsupported("suffix", "'suffix' (fill in the middle)")
    if obj.get("best_of") not in (None, 1):
        raise unsupported("best_of", "'best_of' above 1")
    prompt = obj.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list):
        raise unsupported("prompt", "'prompt' as a list of several prompts or of token ids: send one string")
    if not isinstance(prompt, str) or not prompt:
        raise bad("prompt", "'prompt' must be a non-empty string", "invalid_type")
    logprobs = None if obj.get("logprobs") is None else _int(obj, "logprobs", 0, MAX_LOGPROBS_COMPLETION)
    return ApiRequest(
        "completion", _model(obj), _settings(obj, defaults, "max_tokens", obj.get("max_tokens")),
        prompt=prompt, stream=_stream(obj), include_usage=_include_usage(obj), logprobs=logprobs,
    )


def _object(body: object, known: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise bad(None, "the request body must be a JSON object", "invalid_type")
    unknown = sorted(set(body) - set(known))
    if unknown:
        raise bad(unknown[0], f"unrecognized request argument supplied: {unknown[0]}", "unknown_parameter")
    n = body.get("n")
    if n is not None and n != 1:
        raise unsupported("n", f"'n' = {n!r}: one choice per request (send n requests for n replies)")
    for key in ("frequency_penalty", "presence_penalty"):
        if body.get(key) not in (None, 0, 0.0):
            raise unsupported(key, f"{key!r} other than 0")
    if body.get("logit_bias") not in (None, {}):
        raise unsupported("logit_bias", "'logit_bias'")
    return body


def _model(obj: Mapping[str, Any]) -> str:
    model = obj.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "'model' must be a non-empty string (GET /v1/models lists it)", "invalid_type")
    return model


def _stream(obj: Mapping[str, Any]) -> bool:
    stream = obj.get("stream", False)
    if stream is None:
        return False
    if not isinstance(stream, bool):
        raise bad("stream", f"'stream' must be true or false, got {stream!r}", "invalid_type")
    return stream


def _include_usage(obj: Mapping[str, Any]) -> bool:
    opts = obj.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, Mapping):
        raise bad("stream_options", "'stream_options' must be an object", "invalid_type")
    return bool(opts.get("include_usage"))


def _messages(raw: object) -> tuple[dict[str, str], ...]:
    if not isinstance(raw, list) or not raw:
        raise bad("messages", "'messages' must be a non-empty list of {\"role\", \"content\"}", "invalid_type")
    out = []
    for i, m in enumerate(raw):
        param = f"messages[{i}]"
        if not isinstance(m, Mapping):
            raise bad(param, f"'{param}' must be an object with 'role' and 'content'", "invalid_type")
        role = m.get("role")
        if role in ("tool", "function") or m.get("tool_calls") or m.get("function_call"):
            raise unsupported(param, f"'{param}': tool and function messages")
        if role not in _SUPPORTED_ROLES:
            raise bad(f"{param}.role", f"'{param}.role' must be one of system, developer, user, assistant; got {role!r}")
        out.append({"role": _SUPPORTED_ROLES[role], "content": _content(m.get("content"), f"{param}.content")})
    return tuple(out)


def _content(raw: object, param: str) -> str:
    if isinstance(raw, str):
        return raw
    if raw is None:
        return ""
    if not isinstance(raw, list):
        raise bad(param, f"'{param}' must be a string or a list of text parts", "invalid_type")
    texts = []
    for j, part in enumerate(raw):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in ("image_url", "input_image", "input_audio", "file"):
            raise unsupported(f"{param}[{j}]", f"'{param}[{j}]': {kind} content (this model reads text only)")
        else:
            raise bad(f"{param}[{j}]", f"'{param}[{j}]' must be {{\"type\": \"text\", \"text\": ...}}", "invalid_type")
    return "".join(texts)


def _number(obj: Mapping[str, Any], key: str, default: float, low: float, high: float,
            open_low: bool = False) -> float:
    value = obj.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(key, f"'{key}' must be a number, got {value!r}", "invalid_type")
    if value < low or value > high or (open_low and value == low):
        span = f"({low:g}, {high:g}]" if open_low else f"[{low:g}, {high:g}]"
        raise bad(key, f"'{key}' must be in {span}, got {value!r}")
    return float(value)


def _int(obj: Mapping[str, Any], key: str, low: int, high: int | None = None) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(key, f"'{key}' must be an integer, got {value!r}", "invalid_type")
    if value < low or (high is not None and value > high):
        span = f">= {low}" if high is None else f"from {low} to {high}"
        raise bad(key, f"'{key}' must be an integer {span}, got {value}")
    return value


def _stop(raw: object) -> tuple[str, ...]:
    if raw is None:
        return ()
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise bad("stop", "'stop' must be a non-empty string or a list of them", "invalid_type")
    if len(items) > MAX_STOP:
        raise bad("stop", f"'stop' takes at most {MAX_STOP} strings, got {len(items)}")
    return tuple(items)


def _settings(obj: Mapping[str, Any], d: Defaults, max_key: str, max_tokens: object) -> GenerationSettings:
    n = d.max_tokens if max_tokens is None else _int({max_key: max_tokens}, max_key, 1)
    seed = None if obj.get("seed") is None else _int(obj, "seed", 0, 2**63 - 1)
    sampling = SamplingSettings(
        temperature=_number(obj, "temperature", d.temperature, 0.0, 2.0),
        top_p=_number(obj, "top_p", d.top_p, 0.0, 1.0, open_low=True),
        top_k=d.top_k if obj.get("top_k") is None else _int(obj, "top_k", 0),
        seed=d.seed if seed is None else seed,
    )
    return GenerationSettings(max_new_tokens=n, stop=_stop(obj.get("stop")), sampling=sampling)
