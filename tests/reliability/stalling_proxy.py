"""A real gRPC ``Trunk`` server that forwards to a real daemon and then stops answering steps.

What it stands for: a daemon that accepted a step and stalls (a wedged compute thread, a GPU
hang) while its process, event loop and connections are fine: it answers keepalive pings and
``Info``, so gRPC's keepalive never notices. The real daemon cannot be made to do that on
purpose without a test hook in it, and SIGSTOP would stop its pings too.

The proxy runs a ``grpc.aio`` server on its own event loop thread; each ``Session`` stream opens
its own upstream stream to the daemon and forwards both ways. A stalling stream forwards the
open and the first ``answer_steps`` step replies, then drops every reply after them and holds the
stream open until the client cancels it (which cancels the upstream stream, so the daemon frees
the session). With ``stall_sessions=None`` the monitor stream stalls the same way after
``answer_steps`` samples.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from splitlm.protos import trunk_pb2 as pb
from splitlm.protos import trunk_pb2_grpc as pb_grpc
from splitlm.shared.client import DEFAULT_MAX_MESSAGE_BYTES, channel_options


@dataclass
class ProxyStats:
    """What the proxy saw (read by the test thread; written on the proxy's loop)."""

    sessions: int = 0
    stalled: list[int] = field(default_factory=list)  # indexes of the sessions that stalled
    dropped_replies: int = 0
    cancelled: int = 0  # streams the client cancelled
    infos: int = 0
    stalled_event: threading.Event = field(default_factory=threading.Event)


class _Forwarder(pb_grpc.TrunkServicer):
    def __init__(self, upstream: str, answer_steps: int, stall_sessions: int | None, stats: ProxyStats) -> None:
        self.upstream = upstream
        self.answer_steps = answer_steps
        self.stall_sessions = stall_sessions
        self.stats = stats
        self.channel = grpc.aio.insecure_channel(upstream, options=channel_options(DEFAULT_MAX_MESSAGE_BYTES))
        self.stub = pb_grpc.TrunkStub(self.channel)

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoReply:  # noqa: N802
        self.stats.infos += 1
        return await self.stub.Info(request, timeout=10)

    async def Monitor(  # noqa: N802
        self, request: pb.MonitorRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.MonitorSample]:
        """Forwards samples; a stalling proxy stops after ``answer_steps`` of them."""
        call = self.stub.Monitor(request)
        sent = 0
        try:
            async for sample in call:
                if self.stall_sessions is None and sent >= self.answer_steps:
                    self.stats.stalled_event.set()
                    continue  # still sampled upstream; the client never hears of it
                sent += 1
                yield sample
        finally:
            call.cancel()

    async def Session(  # noqa: N802
        self, request_iterator: AsyncIterator[pb.SessionRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.SessionReply]:
        index = self.stats.sessions
        self.stats.sessions += 1
        stall = self.stall_sessions is None or index < self.stall_sessions
        call = self.stub.Session()

        async def pump() -> None:
            async for req in request_iterator:
                await call.write(req)
            await call.done_writing()

        pumping = asyncio.create_task(pump())
        answered = 0
        try:
            while True:
                reply = await call.read()
                if reply is grpc.aio.EOF:
                    return
                if reply.HasField("result"):
                    if stall and answered >= self.answer_steps:
                        self.stats.dropped_replies += 1
                        if index not in self.stats.stalled:
                            self.stats.stalled.append(index)
                            self.stats.stalled_event.set()
                        continue  # the daemon answered; the client never hears of it
                    answered += 1
                yield reply
        except asyncio.CancelledError:
            self.stats.cancelled += 1
            raise
        finally:
            pumping.cancel()
            call.cancel()


class StallingProxy:
    """Forwards ``address`` to the daemon at ``upstream``; the first ``stall_sessions`` streams
    (None: every stream) stop answering after ``answer_steps`` step replies.

    ``start``/``stop`` from the test thread; the server lives on its own loop thread.
    """

    def __init__(self, upstream: str, address: str, answer_steps: int, stall_sessions: int | None = 1) -> None:
        self.upstream = upstream
        self.address = address
        self.answer_steps = answer_steps
        self.stall_sessions = stall_sessions
        self.stats = ProxyStats()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="stalling-proxy", daemon=True)
        self._server: grpc.aio.Server | None = None

    def start(self) -> StallingProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        return self

    async def _start(self) -> None:
        server = grpc.aio.server(options=channel_options(DEFAULT_MAX_MESSAGE_BYTES))
        pb_grpc.add_TrunkServicer_to_server(
            _Forwarder(self.upstream, self.answer_steps, self.stall_sessions, self.stats), server
        )
        if not server.add_insecure_port(self.address):
            raise RuntimeError(f"the proxy could not listen on {self.address}")
        await server.start()
        self._server = server

    def stop(self) -> None:
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._server.stop(0), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
