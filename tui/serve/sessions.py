"""Trunk sessions kept between requests, keyed by the token prefix their caches hold.

The OpenAI API is stateless: each turn of a conversation resends all of it. A session that
served turn 1 still holds turn 1's positions in the trunk (and in the bottom and top caches
here), so turn 2 only needs its new tokens stepped. The pool hands a request the kept session
whose tokens share the longest prefix with the request's; the request then steps from the end of
that common prefix (a position below what the session holds rolls its caches back: an edited
conversation, a regenerated reply).

Bounds: at most ``max_sessions`` sessions in all (replying or kept), and the kept ones' caches
within ``keep_bytes`` (estimated per position from the model's shape); the least recently used
kept session goes first. A session serves one request at a time: a request takes it out of the
pool (``acquire``) and gives it back (``release``) when its reply ends, however it ends.

Thread-safe: the request threads call ``acquire``/``release``; metrics read ``stats`` from any
thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ...shared.generation import SplitPipeline

log = logging.getLogger(__name__)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass(eq=False)
class Kept:
    """One trunk session with what its caches hold.

    Attributes:
        pipeline: bottom here, trunk in the daemon, top here (its ``tokens`` log the ids the
            caches hold).
        drafter: this session's own drafter (``--draft``), or None.
        used: ``time.monotonic()`` of its last release (least recently used goes first).
    """

    pipeline: SplitPipeline
    drafter: Any = None
    used: float = field(default_factory=time.monotonic)

    @property
    def tokens(self) -> list[int]:
        """The ids every cache of the session holds, positions ``[0, len)``."""
        log_ = self.pipeline.tokens
        return log_.ids[: log_.valid]


@dataclass(frozen=True)
class Lease:
    """A session taken for one request.

    Attributes:
        session: the session.
        start: where the request's tokens start to be stepped (its common prefix with what the
            session held, kept below the request's length so the last token is stepped and
            yields the logits of the first reply token); the tokens reused.
        fresh: the session was opened for this request.
    """

    session: Kept
    start: int
    fresh: bool


@dataclass(frozen=True)
class PoolStats:
    """What the pool holds now and has done so far (for ``/metrics``)."""

    in_use: int
    kept: int
    kept_bytes: int
    opened: int
    hits: int
    reused_tokens: int
    evicted: int


class PoolClosed(Exception):
    """The gateway is shutting down: no more sessions."""


class SessionPool:
    """Sessions by prefix, bounded by count and bytes, least recently used first.

    Args:
        open_session: opens a new session (a new trunk stream); called on a request's thread
            without the pool's lock held.
        max_sessions: sessions at once, replying or kept.
        keep_bytes: the kept sessions' cache bytes (0: keep none).
        bytes_per_position: the cache bytes one position costs a session (trunk and client).
    """

    def __init__(self, open_session: Callable[[], Kept], max_sessions: int, keep_bytes: int,
                 bytes_per_position: int) -> None:
        self._open = open_session
        self.max_sessions = max_sessions
        self.keep_bytes = keep_bytes
        self.bytes_per_position = max(1, bytes_per_position)
        self._cond = threading.Condition()
        self._kept: list[Kept] = []
        self._in_use = 0
        self._opening = 0
        self._closed = False
        self._opened = self._hits = self._reused = self._evicted = 0

    def _bytes(self, s: Kept) -> int:
        return len(s.tokens) * self.bytes_per_position

    def stats(self) -> PoolStats:
        with self._cond:
            return PoolStats(self._in_use, len(self._kept), sum(self._bytes(s) for s in self._kept),
                             self._opened, self._hits, self._reused, self._evicted)

    def acquire(self, ids: Sequence[int], cancelled: Callable[[], bool] = lambda: False) -> Lease:
        """The session for a request of ``ids``: the kept one sharing the longest prefix (when
        that is at least half of what it holds: the same conversation, extended or edited), else
        a new one while under ``max_sessions``, else the kept one sharing the most (the least
        recently used when none shares anything), rolled back to where it agrees; waits while
        every session is replying.

        Raises:
            PoolClosed: the pool closed (shutdown), or ``cancelled()`` turned True while waiting.
        """
        with self._cond:
            while True:
                if self._closed or cancelled():
                    raise PoolClosed
                best, best_len = None, 0
                for s in self._kept:
                    n = common_prefix(s.tokens, ids)
                    if n > best_len:
                        best, best_len = s, n
                total = self._in_use + self._opening + len(self._kept)
                if best is not None and best_len * 2 < len(best.tokens) and total < self.max_sessions:
                    # it shares less than half of what it holds (a shared system prompt, not this
                    # conversation): rolling it back would cost its own conversation more than
                    # this request saves, and there is room for a new session
                    best = None
                if best is None and total >= self.max_sessions and self._kept:
                    best = min(self._kept, key=lambda s: s.used)  # reuse the oldest: no new stream
                    best_len = common_prefix(best.tokens, ids)
                if best is not None:
                    self._kept.remove(best)
                    self._in_use += 1
                    start = min(best_len, len(ids) - 1)
                    if start > 0:
                        self._hits += 1
                        self._reused += start
                    return Lease(best, start, fresh=False)
                if total < self.max_sessions:
                    self._opening += 1
                    break
                self._cond.wait(timeout=0.25)
        try:
            session = self._open()
        except BaseException:
            with self._cond:
                self._opening -= 1
                self._cond.notify_all()
            raise
        with self._cond:
            self._opening -= 1
            self._in_use += 1
            self._opened += 1
        return Lease(session, 0, fresh=True)

    def release(self, session: Kept, keep: bool) -> None:
        """Give a session back after its request: kept for a later turn when ``keep`` (its
        caches are consistent) and the byte budget allows, else closed (the daemon frees its
        cache)."""
        drop: list[Kept] = []
        with self._cond:
            self._in_use -= 1
            if keep and not self._closed and self.keep_bytes > 0 and session.tokens:
                session.used = time.monotonic()
                self._kept.append(session)
                self._kept.sort(key=lambda s: s.used)
                while self._kept and sum(self._bytes(s) for s in self._kept) > self.keep_bytes:
                    drop.append(self._kept.pop(0))
                    self._evicted += 1
            else:
                drop.append(session)
            self._cond.notify_all()
        for s in drop:
            _close(s)

    def close(self) -> None:
        """Close every kept session and refuse new requests (shutdown)."""
        with self._cond:
            self._closed = True
            drop, self._kept = self._kept, []
            self._cond.notify_all()
        for s in drop:
            _close(s)


def _close(s: Kept) -> None:
    try:
        s.pipeline.close()
    except Exception:  # noqa: BLE001 - closing a dead stream: nothing left to free
        log.debug("closing a session failed", exc_info=True)
    if s.drafter is not None:
        s.drafter.close()
