"""The session table: who has a trunk cache, capped, and freed however a stream ends."""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
import torch

from ..shared.cache import PartCache
from .status import SessionRefused

if TYPE_CHECKING:
    from .budget import CacheBudget

log = logging.getLogger(__name__)


@dataclass
class HeldSession:
    """One session as the daemon holds it: its trunk cache and step bookkeeping (the client's
    side of a session is ``shared.client.RemoteSession``).

    Attributes:
        session_id: random id, for logs.
        cache: this session's trunk KV cache.
        wire_dtype: dtype of hidden states in both directions.
        last_step_id: the highest step id applied (a replayed step is never applied twice).
        reserved: bytes this session holds in the daemon's cache budget (between steps, what its
            cache buffers allocate).
    """

    session_id: str
    cache: PartCache
    wire_dtype: torch.dtype
    client: str
    opened_at: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    last_step_id: int = 0
    steps: int = 0
    reserved: int = 0


class SessionStore:
    """Sessions by id, at most ``max_sessions`` at once. Used from the event loop only."""

    def __init__(self, max_sessions: int, budget: CacheBudget | None = None) -> None:
        self.max_sessions = max_sessions
        self.budget = budget
        self._sessions: dict[str, HeldSession] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def cache_bytes(self) -> int:
        """Bytes all sessions' cache buffers allocate (what the budget counts)."""
        return sum(s.cache.allocated_bytes() for s in self._sessions.values())

    def cache_used_bytes(self) -> int:
        """Bytes of the positions all sessions' caches keep (at most ``cache_bytes``)."""
        return sum(s.cache.nbytes() for s in self._sessions.values())

    @contextlib.asynccontextmanager
    async def open(self, cache: PartCache, wire_dtype: torch.dtype, client: str) -> AsyncIterator[HeldSession]:
        """Hold a session for the body of the ``async with``; freed in ``finally``.

        Raises:
            SessionRefused: RESOURCE_EXHAUSTED when the table is full.
        """
        if len(self._sessions) >= self.max_sessions:
            raise SessionRefused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the daemon is at its limit of {self.max_sessions} sessions (--max-sessions); try again later",
            )
        s = HeldSession(uuid.uuid4().hex[:12], cache, wire_dtype, client)
        self._sessions[s.session_id] = s
        log.info("session %s opened by %r (%d open)", s.session_id, client, len(self._sessions))
        try:
            yield s
        finally:
            self._sessions.pop(s.session_id, None)
            if self.budget is not None:
                self.budget.release(s.reserved)
                s.reserved = 0
            log.info(
                "session %s closed after %d steps, %d positions (%d open)",
                s.session_id, s.steps, s.cache.length, len(self._sessions),
            )
