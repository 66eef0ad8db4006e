"""The ``splitlm.v1.Trunk`` servicer: thin, protobuf in, the trunk part, protobuf out.

Torch work runs on one executor thread per device, never on the event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import torch

from ..protos import trunk_pb2 as pb
from ..protos import trunk_pb2_grpc as pb_grpc
from ..shared import codec
from ..shared.cache import ROLLBACK_DEPTH, RollbackTooDeep
from ..shared.errors import ContextExhausted, InvalidStep, SplitlmError
from ..shared.models import Part
from ..shared.plan import Fingerprint
from ..shared.version import __version__
from .batcher import BatchPolicy, StepBatcher
from .budget import CacheBudget, bytes_per_position
from .metrics import StepRecorder
from .monitor import HostProbe, MonitorHub, TrunkState, requested_interval
from .prometheus import Snapshot
from .sessions import SessionStore, TrunkSession
from .status import SessionRefused, code_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """What the daemon allows.

    Attributes:
        max_sessions: sessions open at once.
        max_context: positions per session.
        max_message_bytes: gRPC message size in both directions.
        max_cache_bytes: trunk KV cache of all sessions together (None: no cap).
        idle_timeout_s: close a session that sends no step for this long (0: never).
    """

    max_sessions: int
    max_context: int
    max_message_bytes: int
    max_cache_bytes: int | None = None
    idle_timeout_s: float = 0.0


def check_step_id(step_id: int, last: int) -> None:
    """The step-id rule: within one session ids start at 1 and strictly increase, so a step
    sent twice (a replay on the same stream, a duplicated message) is refused, never applied
    twice. A new session starts again from 1: its cache is new too.

    Raises:
        SessionRefused: INVALID_ARGUMENT for id 0 (unset), ALREADY_EXISTS for an id at or below
            the last one applied.
    """
    if step_id == 0:
        raise SessionRefused(
            grpc.StatusCode.INVALID_ARGUMENT, "step_id is 0 (unset): a session's step ids are 1, 2, 3, ..."
        )
    if step_id <= last:
        raise SessionRefused(
            grpc.StatusCode.ALREADY_EXISTS,
            f"step {step_id} is not above {last}, the last step applied on this session: a step is "
            "applied once; ids increase within a session and start at 1 on a new one",
        )


def leaves_session_as_it_was(e: SplitlmError) -> bool:
    """Whether a step's refusal came before the step changed anything, so the session may go on:
    the cache budget (the only RESOURCE_EXHAUSTED of a step), the context limit, a rollback below
    what sliding windows keep. Protocol errors (step ids, dtypes, shapes, gaps) end the stream."""
    if isinstance(e, SessionRefused):
        return e.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    return isinstance(e, (ContextExhausted, RollbackTooDeep))


class TrunkService(pb_grpc.TrunkServicer):
    """Serves one trunk part to many sessions."""

    def __init__(
        self,
        part: Part,
        fingerprint: Fingerprint,
        limits: Limits,
        executor: ThreadPoolExecutor,
        batching: BatchPolicy | None = None,
    ) -> None:
        self.part = part
        self.fingerprint = fingerprint
        self.limits = limits
        self.executor = executor
        per_position = bytes_per_position(part)
        self.budget = CacheBudget(limits.max_cache_bytes or 2**62, per_position)
        self.layer_position_bytes = per_position // max(1, part.spec.end - part.spec.start)
        """Keys and values of one position in one trunk layer: the unit of ``PartCache.plan``."""
        self.sessions = SessionStore(limits.max_sessions, self.budget)
        self._trunk_types = {part.layer_types[i] for i in range(part.spec.start, part.spec.end)}
        self._stopping: asyncio.Future[None] | None = None
        self.metrics = StepRecorder()
        self.monitor = MonitorHub(HostProbe(), self.metrics, self._trunk_state)
        self.batcher = (
            StepBatcher(part, executor, batching, self.metrics.queue) if batching is not None else None
        )
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

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoReply:
        return pb.InfoReply(
            plan=self.plan,
            limits=pb.Limits(
                max_sessions=self.limits.max_sessions,
                max_context=self.limits.max_context,
                max_message_bytes=self.limits.max_message_bytes,
                max_cache_bytes=self.limits.max_cache_bytes or 0,
                rollback_depth=ROLLBACK_DEPTH if "sliding_attention" in self._trunk_types else 0,
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
        self, request: pb.MonitorRequest, context: grpc.aio.ServicerContext
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
        if req.fingerprint != self.fingerprint.digest:
            what = theirs.differences(self.fingerprint) or ["the plan fingerprint"]
            raise SessionRefused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"plan mismatch: {'; '.join(what)}. This daemon serves {self.plan.model_id} "
                f"layers {self.plan.trunk_start}:{self.plan.trunk_end} (fingerprint {self.fingerprint.digest}); "
                "load the same model and split on the client",
            )
        if req.wire_dtype == pb.DTYPE_UNSPECIFIED:
            return self.part.dtype
        wire = codec.TORCH_OF.get(req.wire_dtype)
        if wire is None:
            raise SessionRefused(grpc.StatusCode.INVALID_ARGUMENT, f"unknown wire dtype {req.wire_dtype}")
        return wire

    def _run_step(
        self, s: TrunkSession, h: torch.Tensor, position: int, into: pb.Tensor | None = None
    ) -> tuple[pb.Tensor, int]:
        """On the executor thread: one trunk step, output encoded in the wire dtype (into ``into``,
        the reply's own field, when given)."""
        t0 = time.perf_counter_ns()
        out = self.part.forward(h, position, s.cache, max_context=self.limits.max_context)
        msg = codec.encode(out, s.wire_dtype, out=into)
        return msg, time.perf_counter_ns() - t0

    async def Session(
        self, request_iterator: AsyncIterator[pb.SessionRequest], context: grpc.aio.ServicerContext
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
            async with self.sessions.open(self.part.new_cache(), wire, first.open.client) as s:
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

    async def _step(self, s: TrunkSession, req: pb.SessionRequest) -> pb.SessionReply:
        if not req.HasField("step"):
            raise SessionRefused(grpc.StatusCode.INVALID_ARGUMENT, "this session is already open; send steps")
        step = req.step
        check_step_id(step.step_id, s.last_step_id)
        h = codec.decode(step.hidden)
        if h.dtype != s.wire_dtype:
            raise InvalidStep(
                f"hidden states are {codec.dtype_name(h.dtype)}, but the session's wire dtype is "
                f"{codec.dtype_name(s.wire_dtype)}"
            )
        self.part.check_input(h)
        position = int(step.position)
        t = int(h.shape[1])
        reachable = position == 0 or s.cache.rollback_floor <= position <= s.cache.length
        if reachable and position + t <= self.limits.max_context:
            # reserve before any buffer grows; a gap, a too deep rollback or an overlong step
            # fails in forward, with nothing allocated
            growth = s.cache.plan(position, t, self.layer_position_bytes, self.budget.free)
            s.reserved = self.budget.reserve(s.reserved, s.reserved + growth.planned, len(self.sessions))
        # the output is encoded straight into the reply: building the reply around an encoded
        # tensor would copy its bytes once more (~1 ms for a 512-token prefill)
        reply = pb.SessionReply()
        into = reply.result.hidden
        try:
            if self.batcher is not None:
                _, ns = await self.batcher.submit(
                    s.cache, h, position, self.limits.max_context,
                    lambda out: codec.encode(out, s.wire_dtype, out=into),
                )
            else:
                _, ns = await self.metrics.queue.run(self.executor, self._run_step, s, h, position, into)
            self.metrics.record(h.shape[1], ns / 1e9)
        finally:
            s.reserved = self.budget.settle(s.reserved, s.cache.allocated_bytes())
        s.last_step_id = step.step_id
        s.steps += 1
        s.last_used = time.monotonic()
        reply.result.step_id = step.step_id
        reply.result.compute_us = min(ns // 1000, 2**32 - 1)
        reply.result.cached_length = s.cache.length
        reply.result.rollback_floor = s.cache.rollback_floor
        return reply
