"""Deadlines for the client's waits on the trunk daemon: how long one step may take, and one
watchdog thread that cancels a stream whose reply is overdue.

Why: gRPC's keepalive only notices a *dead* connection. A daemon that accepted a step and then
stalls (a wedged compute thread, a deadlock, a GPU hang) still answers pings, so without a
deadline the client waits forever. gRPC stream calls have a deadline for the whole call only,
not per message, so the client bounds each step itself.

How long a step may take (``StepDeadline.budget``)::

    budget(t) = floor + t x max(per_position, latency_factor x slowest seconds-per-position seen)

for a step of ``t`` positions. The floor (``--step-deadline``, default 60 s, about what gRPC's
keepalive takes to notice a dead peer) covers a round trip, a queue behind other sessions and a
cold first step; the per-position allowance covers a long prefill before anything was measured
(0.05 s per position: a 4k-token prompt gets 60 + 205 s); once steps have come back, ten times the
slowest seconds-per-position of the session's last 64 steps replaces it when larger, so a slow
device (a big model on a CPU) scales its own budget instead of failing over for being slow. A
replay of many steps pipelined gets one floor plus the allowance for all their positions.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .errors import DaemonUnreachable, UsageError

DEFAULT_FLOOR_S = 60.0
"""The default ``--step-deadline``: about what keepalive takes to drop a dead peer (~40 s)."""

RECENT_STEPS = 64
"""How many recent steps the observed latency is taken over: one slow step long ago does not
stretch every later budget."""


class StepDeadlineExceeded(DaemonUnreachable):
    """The daemon took a step (or the open, or a replay) and did not answer within its budget.

    Transient for failover: the session reconnects and replays, like after a broken stream.
    """


@dataclass(frozen=True)
class StepDeadline:
    """How long the client waits for one step's reply (see the module docstring for the formula).

    Attributes:
        floor_s: every step gets at least this (``--step-deadline``).
        per_position_s: allowance per position of the step before any latency is observed.
        latency_factor: how many times the slowest observed seconds-per-position a step may take.
    """

    floor_s: float = DEFAULT_FLOOR_S
    per_position_s: float = 0.05
    latency_factor: float = 10.0

    def __post_init__(self) -> None:
        if not self.floor_s > 0:
            raise UsageError(f"--step-deadline must be > 0 seconds, got {self.floor_s}")
        if not self.per_position_s >= 0:
            raise UsageError(f"the per-position step allowance must be >= 0, got {self.per_position_s}")
        if not self.latency_factor >= 1:
            raise UsageError(f"the step latency factor must be >= 1, got {self.latency_factor}")

    def budget(self, positions: int, slowest_per_position_s: float = 0.0) -> float:
        """Seconds a step (or a pipelined replay) of ``positions`` positions may take."""
        per = max(self.per_position_s, self.latency_factor * slowest_per_position_s)
        return self.floor_s + max(1, positions) * per

    def explain(self) -> str:
        """How the budget was made, for error messages."""
        return (
            f"--step-deadline {self.floor_s:g} s + {self.per_position_s:g} s per position, or "
            f"{self.latency_factor:g}x the slowest step seen"
        )


class StepClock:
    """A logical session's observed step latency and its next budget.

    Shared by every stream of a failover session, so a resumed stream keeps what was learnt.
    Called by the one thread that steps the session.
    """

    def __init__(self, deadline: StepDeadline) -> None:
        self.deadline = deadline
        self._recent: deque[float] = deque(maxlen=RECENT_STEPS)  # seconds per position

    def observe(self, positions: int, seconds: float) -> None:
        """Record a step of ``positions`` positions that answered after ``seconds``."""
        self._recent.append(seconds / max(1, positions))

    @property
    def slowest_per_position_s(self) -> float:
        return max(self._recent, default=0.0)

    def budget(self, positions: int) -> float:
        return self.deadline.budget(positions, self.slowest_per_position_s)


class Watchdog:
    """One thread that runs callbacks at their deadlines, for every stream of a client.

    A step arms it before waiting for its reply and disarms it after: two lock round trips per
    step instead of a timer thread per step. The thread starts at the first ``arm`` and ends
    at ``close``. Callbacks run on the watchdog's thread and must be quick (cancel a call).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._armed: set[int] = set()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False

    def arm(self, timeout_s: float, callback: Callable[[], None]) -> int:
        """Run ``callback`` in ``timeout_s`` unless ``disarm`` comes first; returns the handle."""
        with self._cond:
            handle = next(self._ids)
            heapq.heappush(self._heap, (time.monotonic() + max(0.0, timeout_s), handle, callback))
            self._armed.add(handle)
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name="splitlm-watchdog", daemon=True)
                self._thread.start()
            self._cond.notify()
            return handle

    def disarm(self, handle: int) -> bool:
        """Forget ``handle``; False when its callback already ran (or is running)."""
        with self._cond:
            if handle in self._armed:
                self._armed.discard(handle)
                return True
            return False

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                while self._heap and self._heap[0][1] not in self._armed:
                    heapq.heappop(self._heap)  # disarmed: drop lazily
                if not self._heap:
                    self._cond.wait()
                    continue
                when, handle, callback = self._heap[0]
                left = when - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                heapq.heappop(self._heap)
                self._armed.discard(handle)
                callback()  # under the lock: disarm cannot return True for a handle that fired

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._armed.clear()
            self._heap.clear()
            self._cond.notify()
