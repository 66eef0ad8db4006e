"""The ``splitlm.v1.Trunk`` servicer: thin, protobuf in, the step logic (``steps``), protobuf out.

Sessions, step checks, the cache budget and the compute queue live in ``TrunkSteps``; this module
only translates messages and statuses and owns the stream's life (idle timeout, shutdown). Torch
work runs on one executor thread per device, but for a decode step that finds it idle: that one
runs on the event loop, saving two thread hand-offs a token (``steps.INLINE_MAX_POSITIONS``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator

import grpc
import torch

from ..protos import trunk_pb2 as pb
from ..protos import trunk_pb2_grpc as pb_grpc
from ..shared import codec
from ..shared.cache import RollbackTooDeep
from ..shared.errors import ContextExhausted, SplitlmError
from ..shared.plan import Fingerprint
from ..shared.version import __version__
from .budget import CacheBudget
from .monitor import HostProbe, MonitorHub, TrunkState, requested_interval
from .prometheus import Snapshot
from .sessions import HeldSession, SessionStore
from .status import SessionRefused, code_for
from .steps import Limits, TrunkSteps, check_step_id, leaves_session_as_it_was

__all__ = ["Limits", "TrunkService", "check_step_id", "leaves_session_as_it_was"]

log = logging.getLogger(__name__)


class TrunkService(pb_grpc.TrunkServicer):
    """Serves one trunk part to many sessions."""

    def __init__(self, steps: TrunkSteps) -> None:
        """Args:
        steps: the sessions and step logic this servicer speaks gRPC for.
        """
        self.steps = steps
        self.part = steps.part
        self.fingerprint = steps.fingerprint
        self.limits = steps.limits
        self.metrics = self.steps.metrics
        self.batcher = self.steps.batcher
        self._stopping: asyncio.Future[None] | None = None
        self.monitor = MonitorHub(HostProbe(), self.metrics, self._trunk_state)
        part, fingerprint = self.part, self.fingerprint
        src = part.source
        self.plan = pb.Plan(
            model_id=src.model_id,
            family=part.family.name,
            model_type=part.config.model_type,
            num_layers=part.num_layers,
            hidden_size=part.hidden_size,
            trunk_start=part.spec.start,
            trunk_end=part.spec.end,
            fingerprint=fingerprint.digest,
            config_digest=fingerprint.config_digest,
            weights_digest=fingerprint.weights_digest,
            dtype=codec.PB_OF[part.dtype],
            device=str(part.device),
            weights="" if fingerprint.precision == "float32" else fingerprint.precision,
        )
        placement = getattr(part, "placement", None)  # a trunk cut over --devices (SpreadPart)
        if placement:
            self.plan.device = ",".join(f"{d}[{a}:{b}]" for d, a, b in placement)
            self.plan.placement.extend(pb.DeviceLayers(device=d, start=a, end=b) for d, a, b in placement)

    @property
    def sessions(self) -> SessionStore:
        return self.steps.sessions

    @property
    def budget(self) -> CacheBudget:
        return self.steps.budget

    async def Info(
        self, request: pb.InfoRequest, context: grpc.aio.ServicerContext[pb.InfoRequest, pb.InfoReply]
    ) -> pb.InfoReply:
        return pb.InfoReply(
            plan=self.plan,
            limits=pb.Limits(
                max_sessions=self.limits.max_sessions,
                max_context=self.limits.max_context,
                max_message_bytes=self.limits.max_message_bytes,
                max_cache_bytes=self.limits.max_cache_bytes or 0,
                rollback_depth=self.steps.rollback_depth,
            ),
            server_version=__version__,
            sessions_open=len(self.sessions),
            batching=self._batching(),
            cache_allocated_bytes=self.sessions.cache_bytes(),
            cache_used_bytes=self.sessions.cache_used_bytes(),
        )

    def _batching(self) -> pb.Batching:
        if self.batcher is None:
            return pb.Batching(enabled=False)
        stats = self.batcher.stats
        return pb.Batching(enabled=True, batches=stats.batches, batched_steps=stats.rows)

    async def metrics_snapshot(self) -> Snapshot:
        """One Prometheus scrape's figures (``--metrics``). Loop only; psutil and NVML in a thread."""
        (rss, cpu), (gpus, gpu_status) = await asyncio.gather(
            asyncio.to_thread(self.monitor.probe.process_figures),
            asyncio.to_thread(self.monitor.probe.gpus),
        )
        p, stats = self.plan, (self.batcher.stats if self.batcher is not None else None)
        return Snapshot(
            plan={"model": p.model_id, "family": p.family, "layers": f"{p.trunk_start}:{p.trunk_end}",
                  "num_layers": str(p.num_layers), "device": p.device, "weights": p.weights or "float32",
                  "fingerprint": p.fingerprint},
            sessions_open=len(self.sessions),
            max_sessions=self.limits.max_sessions,
            steps_queued=len(self.metrics.queue),
            cache_bytes=self.sessions.cache_bytes(),
            cache_used_bytes=self.sessions.cache_used_bytes(),
            cache_budget_bytes=self.limits.max_cache_bytes,
            totals=dataclasses.replace(self.metrics.totals),
            rss_bytes=rss,
            cpu_seconds=cpu,
            gpus=gpus,
            gpu_status=gpu_status,
            batches=stats.batches if stats is not None else None,
            batched_steps=stats.rows if stats is not None else None,
            stopping=self.stopping,
        )

    def _trunk_state(self) -> TrunkState:
        return TrunkState(
            len(self.sessions),
            self.sessions.cache_bytes(),
            self.sessions.cache_used_bytes(),
            self.limits.max_cache_bytes or 0,
        )

    async def Monitor(
        self, request: pb.MonitorRequest, context: grpc.aio.ServicerContext[pb.MonitorRequest, pb.MonitorSample]
    ) -> AsyncIterator[pb.MonitorSample]:
        try:
            interval = requested_interval(request.interval_s)
            async with self.monitor.subscribe(interval) as samples:
                async for sample in samples:
                    yield sample.to_pb()
        except SplitlmError as e:
            await context.abort(code_for(e), str(e))

    def _check_open(self, req: pb.OpenSession) -> torch.dtype:
        theirs = Fingerprint(
            req.config_digest, req.weights_digest, req.trunk_start, req.trunk_end, req.weights or "float32"
        )
        wire = None
        if req.wire_dtype != pb.DTYPE_UNSPECIFIED:
            wire = codec.TORCH_OF.get(req.wire_dtype)
            if wire is None:
                raise SessionRefused(grpc.StatusCode.INVALID_ARGUMENT, f"unknown wire dtype {req.wire_dtype}")
        return self.steps.check_open(theirs, req.fingerprint, wire)

    async def Session(
        self,
        request_iterator: AsyncIterator[pb.SessionRequest],
        context: grpc.aio.ServicerContext[pb.SessionRequest, pb.SessionReply],
    ) -> AsyncIterator[pb.SessionReply]:
        requests = request_iterator.__aiter__()
        try:
            first = await requests.__anext__()
        except StopAsyncIteration:
            return
        try:
            if not first.HasField("open"):
                raise SessionRefused(
                    grpc.StatusCode.INVALID_ARGUMENT, "the first message of a session must be `open`, not a step"
                )
            wire = self._check_open(first.open)
            in_stream = first.open.refusals_in_stream
            async with self.steps.open(wire, _client_label(first.open)) as s:
                yield pb.SessionReply(opened=pb.SessionOpened(session_id=s.session_id, plan=self.plan))
                while (req := await self._next_request(requests)) is not None:
                    try:
                        reply = await self._step(s, req)
                    except (SessionRefused, ContextExhausted, RollbackTooDeep) as e:
                        if not (in_stream and leaves_session_as_it_was(e)):
                            raise
                        log.info("session %s: step %d refused: %s", s.session_id, req.step.step_id, e)
                        reply = pb.SessionReply(refused=pb.StepRefused(
                            step_id=req.step.step_id, code=code_for(e).value[0], message=str(e)
                        ))
                    yield reply
        except SplitlmError as e:
            await context.abort(code_for(e), str(e))

    def _stop_signal(self) -> asyncio.Future[None]:
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_future()
        return self._stopping

    @property
    def stopping(self) -> bool:
        return self._stopping is not None and self._stopping.done()

    def begin_shutdown(self) -> None:
        """On the loop, at SIGTERM: sessions waiting for their next step end now, sessions in a
        step end right after its reply, each with UNAVAILABLE "daemon shutting down"."""
        if not self._stop_signal().done():
            self._stop_signal().set_result(None)

    async def _next_request(self, requests: AsyncIterator[pb.SessionRequest]) -> pb.SessionRequest | None:
        """The session's next message, None when the client closed the stream.

        Raises:
            SessionRefused: UNAVAILABLE when the daemon is shutting down; ABORTED when no
                message came within the idle timeout (the cache is freed; a client may reopen).
        """
        stop = self._stop_signal()
        if not stop.done():
            nxt = asyncio.ensure_future(requests.__anext__())
            timeout = self.limits.idle_timeout_s or None
            try:
                await asyncio.wait((nxt, stop), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not nxt.done():
                    nxt.cancel()
            if nxt.done() and not nxt.cancelled():
                try:
                    return nxt.result()
                except StopAsyncIteration:
                    return None
            if not stop.done():
                raise SessionRefused(
                    grpc.StatusCode.ABORTED,
                    f"session closed after {timeout:g} s without a step (--idle-timeout); its trunk "
                    "cache is freed: open a new session (the client rebuilds it from its tokens)",
                )
        raise SessionRefused(
            grpc.StatusCode.UNAVAILABLE,
            "daemon shutting down: the session is closed; reconnect when it is back",
        )

    async def _step(self, s: HeldSession, req: pb.SessionRequest) -> pb.SessionReply:
        if not req.HasField("step"):
            raise SessionRefused(grpc.StatusCode.INVALID_ARGUMENT, "this session is already open; send steps")
        step = req.step
        # the output is encoded straight into the reply: building the reply around an encoded
        # tensor would copy its bytes once more (~1 ms for a 512-token prefill)
        reply = pb.SessionReply()
        into = reply.result.hidden
        done = await self.steps.step(
            s, step.step_id, int(step.position), step.hidden,
            lambda out: codec.encode(out, s.wire_dtype, out=into),
        )
        reply.result.step_id = step.step_id
        reply.result.compute_us = min(done.compute_ns // 1000, 2**32 - 1)
        reply.result.cached_length = done.cached_length
        reply.result.rollback_floor = done.rollback_floor
        return reply


def _client_label(req: pb.OpenSession) -> str:
    """Who opened a session, for the log: the client's name, and its own parts' precision when it
    differs from the trunk's (``OpenSession.client_weights``)."""
    if req.client_weights:
        return f"{req.client} (bottom and top at {req.client_weights})"
    return req.client
