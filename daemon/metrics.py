"""Trunk step metrics for the monitor: steps completed (positions, compute time) and queue depth.

The servicer records each step when it completes; the monitor sampler asks for a window (the
steps completed in its last interval) and reads the queue depth. Records older than the longest
monitor interval are dropped, so memory stays bounded whether or not anyone listens.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TypeVar

from ..shared.stats import percentile

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class StepWindow:
    """The steps completed in ``[start, end)`` of the monotonic clock.

    Attributes:
        seconds: the window's length.
        positions: positions computed by those steps (a prefill of 20 tokens counts 20).
        p50_ms, p95_ms: step compute time percentiles (``shared.stats.percentile``, the one
            every face uses); 0.0 without steps, as the monitor's wire format says.
    """

    seconds: float
    steps: int
    positions: int
    p50_ms: float
    p95_ms: float

    @property
    def tokens_per_s(self) -> float:
        return self.positions / self.seconds if self.seconds > 0 else 0.0


class QueueGauge:
    """How many steps wait for the compute executor (submitted, not yet started).

    Counted on the event loop when a step is submitted and on the executor thread when it
    starts, hence the lock; a step cancelled while waiting leaves the count too.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting = 0

    def __len__(self) -> int:
        return self._waiting

    def add(self, n: int) -> None:
        """``n`` more steps wait (negative: that many started); the batcher counts this way."""
        with self._lock:
            self._waiting += n

    async def run(self, executor: Executor, fn: Callable[..., T], *args: object, weight: int = 1) -> T:
        """``fn(*args)`` on ``executor``, counted as ``weight`` waiting steps (a batch: its rows)
        until it starts. Loop only."""
        left = [False]  # one ticket: leaves the count once, whoever gets there first

        def leave() -> None:
            with self._lock:
                if not left[0]:
                    left[0] = True
                    self._waiting -= weight

        def started() -> T:
            leave()
            return fn(*args)

        with self._lock:
            self._waiting += weight
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, started)
        finally:
            leave()


@dataclass
class StepTotals:
    """Every step since the daemon started (Prometheus counters: they only grow)."""

    steps: int = 0
    positions: int = 0
    compute_s: float = 0.0


class StepRecorder:
    """Steps the trunk completed, kept for ``horizon_s``; and the compute queue.

    ``record`` and ``window`` are called from the event loop only.

    Args:
        horizon_s: how long a record is kept: at least the longest monitor interval.
        clock: monotonic seconds (injectable for tests).
    """

    def __init__(self, horizon_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.horizon_s = horizon_s
        self.clock = clock
        self.queue = QueueGauge()
        self._steps: deque[tuple[float, int, float]] = deque()  # (completed at, positions, compute s)
        self.totals = StepTotals()

    def __len__(self) -> int:
        return len(self._steps)

    def record(self, positions: int, compute_s: float) -> None:
        """One step completed now: ``positions`` computed in ``compute_s`` seconds."""
        now = self.clock()
        self._steps.append((now, positions, compute_s))
        self.totals.steps += 1
        self.totals.positions += positions
        self.totals.compute_s += compute_s
        self._prune(now)

    def _prune(self, now: float) -> None:
        while self._steps and self._steps[0][0] < now - self.horizon_s:
            self._steps.popleft()

    def window(self, start: float, end: float) -> StepWindow:
        """The steps completed in ``[start, end)`` (monotonic clock)."""
        self._prune(self.clock())
        picked = [(p, c) for at, p, c in self._steps if start <= at < end]
        times_ms = [c * 1e3 for _, c in picked]
        return StepWindow(
            seconds=end - start,
            steps=len(picked),
            positions=sum(p for p, _ in picked),
            p50_ms=percentile(times_ms, 0.50) if times_ms else 0.0,
            p95_ms=percentile(times_ms, 0.95) if times_ms else 0.0,
        )
