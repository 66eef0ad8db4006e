"""The HTTP face: a Starlette app with OpenAI's routes, ``/health`` and ``/metrics``.

Handlers run on the event loop and only parse, tokenize and format; each reply is generated on a
worker thread (``Engine.reply``). A streamed reply's tokens cross from that thread to the loop
through an ``asyncio.Queue``; when the client goes away the reply stops at its next step and its
session goes back to the pool.

Every error leaves in OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``),
including a body that is not JSON, an unknown route and a missing or wrong API key.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ...shared.errors import SplitlmError
from . import replies
from .protocol import ApiError, ApiRequest, Defaults, parse_chat, parse_completion
from .sessions import PoolClosed

if TYPE_CHECKING:
    from ...shared.generation import TokenEvent, TokenLogprobs
    from .engine import Engine, Reply

log = logging.getLogger(__name__)

OPEN_PATHS = ("/health",)
"""Paths answered without the API key (probes)."""


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


class ApiKey:
    """ASGI middleware: with a key, every path but ``OPEN_PATHS`` needs ``Authorization: Bearer
    KEY`` (compared in constant time); without one it passes everything through."""

    def __init__(self, app: ASGIApp, key: str | None) -> None:
        self.app = app
        self.key = key.encode() if key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.key is None or scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or ()).get(b"authorization", b"")
        scheme, _, given = header.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.key):
            await self.app(scope, receive, send)
            return
        what = "no API key given" if not header else "the API key is wrong"
        e = ApiError(401, f"{what}: send Authorization: Bearer KEY with the key of --api-key-file",
                     type="authentication_error", code="invalid_api_key")
        await error_response(e)(scope, receive, send)


class EventStream(Response):
    """Server-sent events from an async iterator of JSON objects, ``data: [DONE]`` last.

    It watches the connection itself: a client that goes away sets ``gone`` (the reply's stop
    flag) and ends the stream; the iterator is always closed, so its cleanup runs.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[dict[str, Any]], gone: threading.Event,
                 on_disconnect: Callable[[], None]) -> None:
        super().__init__(headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        # chunked: the length is not known (Response's empty body declared 0)
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self.events = events
        self.gone = gone
        self.on_disconnect = on_disconnect
        self.disconnected = False

    def _lost(self) -> None:
        self.disconnected = True
        self.gone.set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    self._lost()
                    return

        watcher = asyncio.ensure_future(watch())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for obj in self.events:
                if self.disconnected:
                    break
                await send({"type": "http.response.body", "body": sse(obj), "more_body": True})
            if not self.disconnected:
                await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
        except OSError:  # the connection broke while sending
            self._lost()
        finally:
            watcher.cancel()
            await self.events.aclose()  # type: ignore[attr-defined]  # an async generator
            if self.disconnected:
                self.on_disconnect()


def sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class Gateway:
    """The routes, over one ``Engine``.

    Args:
        engine: tokenizer, pool, limits.
        defaults: what a request that leaves a field out gets.
        health: asks the daemon whether it answers (blocking; run on a worker thread).
        workers: threads for replies (requests in flight, waiting ones included).
    """

    def __init__(self, engine: Engine, defaults: Defaults, health: Callable[[], dict[str, Any]],
                 workers: int) -> None:
        self.engine = engine
        self.defaults = defaults
        self.health_check = health
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="serve")

    def app(self, api_key: str | None) -> ASGIApp:
        routes = [
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
        ]
        app = Starlette(routes=routes, exception_handlers={
            ApiError: self._api_error, HTTPException: self._http_error, Exception: self._bug,
        })
        return ApiKey(app, api_key)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    # ---- errors, all in OpenAI's shape

    async def _api_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error_response(exc)

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                       code=code))

    async def _bug(self, request: Request, exc: Exception) -> Response:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"))

    # ---- routes

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        if name != self.engine.model_id:
            raise ApiError(404, f"the model {name!r} does not exist here; GET /v1/models lists "
                           f"{self.engine.model_id!r}", param="model", code="model_not_found")
        return JSONResponse(self._model_card())

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.engine.model_id, "object": "model", "created": self.engine.created,
                "owned_by": "splitlm"}

    async def health(self, request: Request) -> Response:
        loop = asyncio.get_running_loop()
        try:
            info = await loop.run_in_executor(None, self.health_check)
        except SplitlmError as e:
            return JSONResponse({"status": "unavailable", "detail": str(e).splitlines()[0]}, status_code=503)
        return JSONResponse({"status": "ok", **info})

    async def metrics(self, request: Request) -> Response:
        return Response(self.engine.metrics.exposition(), media_type=self.engine.metrics.content_type)

    async def chat(self, request: Request) -> Response:
        return await self._complete(request, "/v1/chat/completions", parse_chat)

    async def completions(self, request: Request) -> Response:
        return await self._complete(request, "/v1/completions", parse_completion)

    async def _complete(self, request: Request, endpoint: str, parse: Callable[[object, Defaults], ApiRequest]) -> Response:
        t0 = time.perf_counter()
        try:
            try:
                body = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ApiError(400, f"the request body is not JSON: {e}", code="invalid_json") from None
            req = parse(body, self.defaults)
            ids = self.engine.prompt_ids(req)
            response = (self._stream(req, ids, t0, endpoint) if req.stream
                        else await self._whole(req, ids, t0))
        except ApiError as e:
            self.engine.metrics.requests.labels(endpoint, str(e.status)).inc()
            raise
        if not req.stream:
            self.engine.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        return response

    def _run(self, req: ApiRequest, ids: list[int], on_token: Callable[[TokenEvent], None] | None,
             stop: threading.Event) -> Reply:
        """On a worker thread: the reply, with trunk failures as OpenAI errors."""
        try:
            return self.engine.reply(req, ids, on_token, stop.is_set)
        except PoolClosed:
            raise ApiError(503, "the gateway is shutting down", type="server_error", code="unavailable") from None
        except SplitlmError as e:
            log.warning("a reply failed: %s", e)
            raise ApiError(502, f"the trunk daemon failed this reply: {str(e).splitlines()[0]}",
                           type="server_error", code="trunk_error") from None

    async def _whole(self, req: ApiRequest, ids: list[int], t0: float) -> Response:
        m = self.engine.metrics
        loop = asyncio.get_running_loop()
        first: list[float] = []
        lps: list[TokenLogprobs] = []

        def on_token(ev: TokenEvent) -> None:
            if not first:
                first.append(time.perf_counter())
            if ev.logprobs is not None:
                lps.append(ev.logprobs)

        reply = await loop.run_in_executor(self.executor, self._run, req, ids, on_token, threading.Event())
        if first:
            m.ttft.observe(first[0] - t0)
        m.latency.observe(time.perf_counter() - t0)
        res, rid, tok = reply.result, _id(req), self.engine.tokenizer
        if req.kind == "chat":
            content = None
            if req.logprobs is not None:
                content = [replies.chat_logprob(tok, t, lp) for t, lp in zip(res.token_ids, lps)]
            return JSONResponse(replies.chat_completion(rid, int(time.time()), req.model, res, content,
                                                        reply.prompt_tokens))
        clp = None
        if req.logprobs is not None:
            clp = replies.completion_logprobs(tok, res.token_ids, lps)
        return JSONResponse(replies.text_completion(
            rid, int(time.time()), req.model, res.text, replies.FINISH[res.finish_reason], clp,
            replies.usage(reply.prompt_tokens, len(res.token_ids))))

    def _stream(self, req: ApiRequest, ids: list[int], t0: float, endpoint: str) -> Response:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        gone = threading.Event()
        m = self.engine.metrics
        rid, created = _id(req), int(time.time())

        def put(kind: str, item: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (kind, item))
            except RuntimeError:  # the loop closed (shutdown): nobody is listening
                pass

        def work() -> None:  # a worker thread
            try:
                put("done", self._run(req, ids, lambda ev: put("token", (ev, time.perf_counter())), gone))
            except ApiError as e:
                put("error", e)
            except Exception as e:  # noqa: BLE001 - a bug: reported to the client, logged
                log.exception("a streamed reply failed")
                put("error", ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))

        async def events() -> AsyncIterator[dict[str, Any]]:
            future = loop.run_in_executor(self.executor, work)
            status = "200"
            try:
                if req.kind == "chat":
                    yield replies.chat_chunk(rid, created, req.model, {"role": "assistant", "content": ""})
                sent = ""
                offset = 0
                while True:
                    kind, item = await queue.get()
                    if kind == "token":
                        ev: TokenEvent = item[0]
                        if ev.index == 0:
                            m.ttft.observe(time.perf_counter() - t0)
                        if not ev.delta and ev.logprobs is None:
                            continue
                        sent += ev.delta
                        yield self._chunk(req, rid, created, ev.delta, ev, offset)
                        # back here once the chunk was sent: the gateway's own cost of this token
                        m.delivery.observe(time.perf_counter() - item[1])
                        offset += len(ev.delta)
                        continue
                    if kind == "error":
                        e: ApiError = item
                        status = str(e.status)
                        yield e.body()
                        return
                    reply: Reply = item
                    res = reply.result
                    rest = res.text[len(sent):] if res.text.startswith(sent) else ""
                    finish = replies.FINISH[res.finish_reason]
                    if req.kind == "chat":
                        yield replies.chat_chunk(rid, created, req.model, {"content": rest} if rest else {}, finish)
                    else:
                        yield replies.text_completion(rid, created, req.model, rest, finish, None, None)
                    if req.include_usage:
                        yield replies.usage_chunk(rid, created, req.model, req.kind,
                                                  replies.usage(reply.prompt_tokens, len(res.token_ids)))
                    m.latency.observe(time.perf_counter() - t0)
                    return
            finally:
                gone.set()  # stops the reply at its next step if it is still running
                m.requests.labels(endpoint, status).inc()
                del future

        return EventStream(events(), gone, m.disconnects.inc)

    def _chunk(self, req: ApiRequest, rid: str, created: int, delta: str, ev: TokenEvent, offset: int) -> dict[str, Any]:
        tok = self.engine.tokenizer
        if req.kind == "chat":
            lps = None if ev.logprobs is None else [replies.chat_logprob(tok, ev.token_id, ev.logprobs)]
            return replies.chat_chunk(rid, created, req.model, {"content": delta}, None, lps)
        clp = None if ev.logprobs is None else replies.completion_logprobs(tok, [ev.token_id], [ev.logprobs], offset)
        return replies.text_completion(rid, created, req.model, delta, None, clp, None)


def _id(req: ApiRequest) -> str:
    return ("chatcmpl-" if req.kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]

