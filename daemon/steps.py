"""The daemon's session and step logic, without gRPC: what ``TrunkService`` translates to and from.

One ``TrunkSteps`` owns the trunk part, the session store, the cache budget, the batcher and the
step recorder. It checks a session's opening and each step once (step ids, dtype, shape, position,
context, budget), reserves the cache bytes a step will allocate before it runs, runs it on the
executor (or in a batch) and settles the budget after. Tests drive it in-process, without a socket.

Loop only: every method runs on the daemon's event loop. Torch work goes to the executor, but for
one kind of step: a short step (``INLINE_MAX_POSITIONS``, a decode step) that finds the compute
thread idle runs on the loop itself. Handing it to the executor and back cost two thread wake-ups
(~0.5 ms of a ~30 ms step, BENCHMARKS.md's step timeline); the loop is held for one decode step at
most, while a prefill still runs on the executor, so the monitor, ``Info``, health and other
sessions are answered during it (tests/integration/test_long_prefill.py).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import torch

from ..protos import trunk_pb2 as pb
from ..shared import codec
from ..shared.cache import ROLLBACK_DEPTH, RollbackTooDeep
from ..shared.errors import ContextExhausted, InvalidStep, SplitlmError
from ..shared.models import Part
from ..shared.plan import Fingerprint
from .batcher import BatchPolicy, StepBatcher
from .budget import CacheBudget, bytes_per_position
from .metrics import StepRecorder
from .schedule import SlicedStep, layers_per_slice, run_sliced
from .sessions import HeldSession, SessionStore
from .status import SessionRefused

log = logging.getLogger(__name__)

INLINE_MAX_POSITIONS = 4
"""A step of at most this many positions runs on the event loop when the compute thread is idle:
as long as a decode step (or a short speculative verify), never a prefill."""


@dataclass(frozen=True)
class Limits:
    """What the daemon allows.

    Attributes:
        max_sessions: sessions open at once.
        max_context: positions per session.
        max_message_bytes: gRPC message size in both directions.
        max_cache_bytes: trunk KV cache buffers of all sessions together (None: no cap).
        idle_timeout_s: close a session that sends no step for this long (0: never).
    """

    max_sessions: int
    max_context: int
    max_message_bytes: int
    max_cache_bytes: int | None = None
    idle_timeout_s: float = 0.0


@dataclass(frozen=True)
class StepDone:
    """A step that ran.

    Attributes:
        compute_ns: the trunk's compute time for it (its batch's, when batched).
        cached_length: the session's cache length after it.
        rollback_floor: the lowest position a later step may start from (but 0).
    """

    compute_ns: int
    cached_length: int
    rollback_floor: int


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
        return bool(e.code == grpc.StatusCode.RESOURCE_EXHAUSTED)
    return isinstance(e, (ContextExhausted, RollbackTooDeep))


class TrunkSteps:
    """Sessions and steps of one trunk part. Loop only.

    Args:
        part: the trunk layers.
        fingerprint: the plan's; an opening session must present the same.
        limits: sessions, context, cache bytes.
        executor: the device's compute thread.
        batching: batch concurrent decode steps (``--batch``); None runs each alone.
        prefill_slice: run a step of more positions x trunk layers than this in slices of
            layers, so other sessions' steps run in between (``daemon.schedule``; 0: never).
    """

    def __init__(
        self,
        part: Part,
        fingerprint: Fingerprint,
        limits: Limits,
        executor: ThreadPoolExecutor,
        batching: BatchPolicy | None = None,
        prefill_slice: int = 0,
    ) -> None:
        self.part = part
        self.fingerprint = fingerprint
        self.limits = limits
        self.executor = executor
        self.prefill_slice = prefill_slice
        per_position = bytes_per_position(part)
        self.budget = CacheBudget(limits.max_cache_bytes or 2**62, per_position)
        self.layer_position_bytes = per_position // max(1, part.spec.end - part.spec.start)
        """Keys and values of one position in one trunk layer: the unit of ``PartCache.plan``."""
        self.sessions = SessionStore(limits.max_sessions, self.budget)
        self.metrics = StepRecorder()
        self.batcher = (
            StepBatcher(part, executor, batching, self.metrics.queue) if batching is not None else None
        )
        types = {part.layer_types[i] for i in range(part.spec.start, part.spec.end)}
        self._compute = threading.Lock()
        """Held while a step computes, on whichever thread: the loop runs a short step only if it
        can take it at once (a step cancelled while on the executor still holds it until done)."""
        self.rollback_depth = ROLLBACK_DEPTH if "sliding_attention" in types or "chunked_attention" in types else 0
        """Positions sliding-window layers keep beyond their window; 0: all history is kept."""

    def check_open(self, theirs: Fingerprint, digest: str, wire: torch.dtype | None) -> torch.dtype:
        """The session's wire dtype, once its plan is this daemon's.

        Args:
            theirs: the client's fingerprint components; ``digest`` its digest.
            wire: the dtype asked for; None for the trunk's own.

        Raises:
            SessionRefused: FAILED_PRECONDITION naming what differs.
        """
        if digest != self.fingerprint.digest:
            what = theirs.differences(self.fingerprint) or ["the plan fingerprint"]
            spec = self.part.spec
            raise SessionRefused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"plan mismatch: {'; '.join(what)}. This daemon serves {self.part.source.model_id} "
                f"layers {spec.start}:{spec.end} (fingerprint {self.fingerprint.digest}); "
                "load the same model and split on the client",
            )
        return self.part.dtype if wire is None else wire

    def open(self, wire: torch.dtype, client: str) -> contextlib.AbstractAsyncContextManager[HeldSession]:
        """A new session with an empty cache for the body of an ``async with``; freed after it.

        Raises:
            SessionRefused: RESOURCE_EXHAUSTED when ``max_sessions`` are open.
        """
        return self.sessions.open(self.part.new_cache(), wire, client)

    async def step(
        self,
        s: HeldSession,
        step_id: int,
        position: int,
        hidden: pb.Tensor,
        encode: Callable[[torch.Tensor], object],
    ) -> StepDone:
        """Check and run one step of ``s``; ``encode`` gets the output on the compute thread.

        Raises:
            SessionRefused: a step id out of order; RESOURCE_EXHAUSTED when the cache budget
                cannot hold what the step allocates (nothing changed).
            InvalidStep, PositionError, ContextExhausted, RollbackTooDeep: the step does not fit
                the session (nothing changed).
        """
        check_step_id(step_id, s.last_step_id)
        h = codec.decode(hidden)
        if h.dtype != s.wire_dtype:
            raise InvalidStep(
                f"hidden states are {codec.dtype_name(h.dtype)}, but the session's wire dtype is "
                f"{codec.dtype_name(s.wire_dtype)}"
            )
        self.part.check_input(h)
        t = int(h.shape[1])
        reachable = position == 0 or s.cache.rollback_floor <= position <= s.cache.length
        grows = True  # unless planned otherwise, count the buffers again after the step
        if reachable and position + t <= self.limits.max_context:
            # reserve before any buffer grows; a gap, a too deep rollback or an overlong step
            # fails in forward, with nothing allocated
            growth = s.cache.plan(position, t, self.layer_position_bytes, self.budget.free)
            s.reserved = self.budget.reserve(s.reserved, s.reserved + growth.planned, len(self.sessions))
            grows = growth.planned > 0
        per_slice = layers_per_slice(t, self.part.spec.end - self.part.spec.start, self.prefill_slice)
        try:
            if per_slice < self.part.spec.end - self.part.spec.start:
                sliced = SlicedStep(self.part, h, position, s.cache, self.limits.max_context, per_slice)
                _, ns = await run_sliced(self.executor, self.metrics.queue, sliced, encode, self._compute)
            elif self.batcher is not None:
                _, ns = await self.batcher.submit(s.cache, h, position, self.limits.max_context, encode)
            elif t <= INLINE_MAX_POSITIONS and not len(self.metrics.queue) and self._compute.acquire(blocking=False):
                try:  # nothing else computes, or waits to: no hand-off for a decode step
                    _, ns = self._forward(s, h, position, encode)
                finally:
                    self._compute.release()
            else:
                _, ns = await self.metrics.queue.run(self.executor, self._run, s, h, position, encode)
            self.metrics.record(t, ns / 1e9)
        finally:
            if grows:  # a step planned to grow nothing allocates nothing (most decode steps)
                s.reserved = self.budget.settle(s.reserved, s.cache.allocated_bytes())
        s.last_step_id = step_id
        s.steps += 1
        s.last_used = time.monotonic()
        return StepDone(ns, s.cache.length, s.cache.rollback_floor)

    def _run(
        self, s: HeldSession, h: torch.Tensor, position: int, encode: Callable[[torch.Tensor], object]
    ) -> tuple[object, int]:
        """On the executor thread: one trunk step under the compute lock."""
        with self._compute:
            return self._forward(s, h, position, encode)

    def _forward(
        self, s: HeldSession, h: torch.Tensor, position: int, encode: Callable[[torch.Tensor], object]
    ) -> tuple[object, int]:
        """One trunk step, its output handed to ``encode``; the caller holds the compute lock."""
        t0 = time.perf_counter_ns()
        out = self.part.forward(h, position, s.cache, max_context=self.limits.max_context)
        return encode(out), time.perf_counter_ns() - t0
