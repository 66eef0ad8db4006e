"""The ``splitlm.v1.Trunk`` servicer: thin, protobuf in, the trunk part, protobuf out.

Torch work runs on one executor thread per device, never on the event loop.
"""

from __future__ import annotations

import asyncio
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
from ..shared.errors import InvalidStep, SplitlmError
from ..shared.models import Part
from ..shared.plan import Fingerprint
from ..shared.version import __version__
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
    """

    max_sessions: int
    max_context: int
    max_message_bytes: int


class TrunkService(pb_grpc.TrunkServicer):
    """Serves one trunk part to many sessions."""

    def __init__(self, part: Part, fingerprint: Fingerprint, limits: Limits, executor: ThreadPoolExecutor) -> None:
        self.part = part
        self.fingerprint = fingerprint
        self.limits = limits
        self.executor = executor
        self.sessions = SessionStore(limits.max_sessions)
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
        )

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoReply:
        return pb.InfoReply(
            plan=self.plan,
            limits=pb.Limits(
                max_sessions=self.limits.max_sessions,
                max_context=self.limits.max_context,
                max_message_bytes=self.limits.max_message_bytes,
            ),
            server_version=__version__,
            sessions_open=len(self.sessions),
        )

    def _check_open(self, req: pb.OpenSession) -> torch.dtype:
        theirs = Fingerprint(req.config_digest, req.weights_digest, req.trunk_start, req.trunk_end)
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

    def _run_step(self, s: TrunkSession, h: torch.Tensor, position: int) -> tuple[pb.Tensor, int]:
        """On the executor thread: one trunk step, output encoded in the wire dtype."""
        t0 = time.perf_counter_ns()
        out = self.part.forward(h, position, s.cache, max_context=self.limits.max_context)
        msg = codec.encode(out, s.wire_dtype)
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
            async with self.sessions.open(self.part.new_cache(), wire, first.open.client) as s:
                yield pb.SessionReply(opened=pb.SessionOpened(session_id=s.session_id, plan=self.plan))
                async for req in requests:
                    yield await self._step(s, req)
        except SplitlmError as e:
            await context.abort(code_for(e), str(e))

    async def _step(self, s: TrunkSession, req: pb.SessionRequest) -> pb.SessionReply:
        if not req.HasField("step"):
            raise SessionRefused(grpc.StatusCode.INVALID_ARGUMENT, "this session is already open; send steps")
        step = req.step
        h = codec.decode(step.hidden)
        if h.dtype != s.wire_dtype:
            raise InvalidStep(
                f"hidden states are {codec.dtype_name(h.dtype)}, but the session's wire dtype is "
                f"{codec.dtype_name(s.wire_dtype)}"
            )
        self.part.check_input(h)
        loop = asyncio.get_running_loop()
        msg, ns = await loop.run_in_executor(self.executor, self._run_step, s, h, int(step.position))
        s.last_step_id = max(s.last_step_id, step.step_id)
        s.steps += 1
        s.last_used = time.monotonic()
        return pb.SessionReply(
            result=pb.StepResult(
                step_id=step.step_id,
                hidden=msg,
                compute_us=min(ns // 1000, 2**32 - 1),
                cached_length=s.cache.length,
            )
        )
