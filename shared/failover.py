"""Session failover: when the stream to the trunk daemon breaks, reconnect, rebuild, continue.

The client keeps its session's *step history*: for every step still reflected in the trunk cache,
its first position and the hidden states it sent, exactly as encoded on the wire. The daemon's
cache is a function of that sequence of steps, so sending the same steps again (same chunks, same
positions, same bytes) to a new session rebuilds a cache bit for bit equal to the lost one, and
the greedy continuation is token-identical to an uninterrupted run. One prefill over the whole
prefix would not be: float32 sums taken in another order differ in the last bits, and greedy
choices between near-tied tokens follow them.

The replay is pipelined: every step is queued before the first reply is read, so it costs the
daemon's compute plus one round trip, not one round trip per step. Keeping the sent hidden states
costs ``hidden_size x itemsize`` bytes per position (2,304 B for SmolLM2 in float32); in exchange
the client recomputes nothing.

Which errors are worth a retry: the stream breaking (UNAVAILABLE: daemon killed, restarted,
connection reset; CANCELLED or ABORTED from a daemon that closes sessions as it stops), and a
step with no reply within its deadline (``StepDeadlineExceeded``: a daemon stalled while its
connection still answers keepalive pings; the stream is cancelled and the session replayed on a
new one, where a daemon that stalls again runs out the retry deadline). Anything
else (FAILED_PRECONDITION for a plan mismatch, INVALID_ARGUMENT, RESOURCE_EXHAUSTED, ...) is an
answer, not an outage, and surfaces at once.
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

import torch

from . import codec
from .deadline import StepDeadlineExceeded
from .errors import DaemonUnreachable, SplitlmError, StepRefused, TrunkError, UsageError

if TYPE_CHECKING:
    from ..protos import trunk_pb2 as pb
    from .client import TrunkStream
    from .config import ClientSettings

log = logging.getLogger(__name__)

TRANSIENT_CODES = frozenset({"UNAVAILABLE", "CANCELLED", "ABORTED"})
"""gRPC status codes that mean the stream broke rather than the daemon refusing the request."""


@dataclass(frozen=True)
class RetryPolicy:
    """How long and how often to try to get a broken session back.

    Delays grow from ``initial_delay_s`` by ``multiplier`` up to ``max_delay_s``; each is drawn
    from ``[d x (1 - jitter), d]`` so clients that lost the same daemon do not come back in step.

    Attributes:
        initial_delay_s: wait before the first attempt.
        max_delay_s: the longest wait between two attempts.
        deadline_s: give up this long after the stream broke; 0 turns failover off. The default
            leaves time for a daemon restart that reloads a large model.
        multiplier: growth of the delay per attempt.
        jitter: fraction of each delay that is random, in ``[0, 1]``.
    """

    initial_delay_s: float = 0.25
    max_delay_s: float = 2.0
    deadline_s: float = 180.0
    multiplier: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if not self.initial_delay_s > 0:
            raise UsageError(f"--retry-initial must be > 0 seconds, got {self.initial_delay_s}")
        if not self.max_delay_s >= self.initial_delay_s:
            raise UsageError(
                f"--retry-max-delay must be >= --retry-initial ({self.initial_delay_s} s), "
                f"got {self.max_delay_s}"
            )
        if not self.deadline_s >= 0:
            raise UsageError(
                f"--retry-deadline must be >= 0 seconds (0: no failover), got {self.deadline_s}"
            )
        if not self.multiplier >= 1:
            raise UsageError(f"the retry multiplier must be >= 1, got {self.multiplier}")
        if not 0 <= self.jitter <= 1:
            raise UsageError(f"the retry jitter must be in [0, 1], got {self.jitter}")

    @classmethod
    def from_settings(cls, settings: ClientSettings) -> RetryPolicy:
        """The policy of the ``--retry-*`` settings (``retry_initial``, ``retry_max_delay``,
        ``retry_deadline``); every front end builds it here, so they cannot drift apart.

        Raises:
            UsageError: the settings contradict each other (max delay below the first).
        """
        return cls(
            initial_delay_s=settings.retry_initial,
            max_delay_s=settings.retry_max_delay,
            deadline_s=settings.retry_deadline,
        )

    @property
    def enabled(self) -> bool:
        return self.deadline_s > 0

    def delays(self, rng: random.Random) -> Iterator[float]:
        """The waits before attempt 1, 2, ... (endless; the deadline bounds them)."""
        base = self.initial_delay_s
        while True:
            yield base * (1.0 - self.jitter * rng.random())
            base = min(self.max_delay_s, base * self.multiplier)


NO_FAILOVER = RetryPolicy(deadline_s=0)


@dataclass(frozen=True)
class Reconnecting:
    """The stream broke; the client waits ``delay_s`` and then tries attempt ``attempt``.

    Attributes:
        attempt: 1 for the first try after the break.
        delay_s: the wait before this attempt.
        error: what broke the stream or failed the previous attempt.
        elapsed_s: time since the stream broke.
        deadline_s: the client gives up when ``elapsed_s`` would pass this.
    """

    attempt: int
    delay_s: float
    error: str
    elapsed_s: float
    deadline_s: float


@dataclass(frozen=True)
class Resumed:
    """A new session holds the lost session's cache again; the interrupted step has its reply.

    Attributes:
        attempts: attempts it took (1: the first try worked).
        downtime_s: from the break to the interrupted step's reply.
        replayed_steps: steps sent again (the interrupted one included).
        replayed_positions: positions the daemon computed again.
        replay_s: from the new session's open to the last replayed step's reply.
        session_id: the new session's id.
    """

    attempts: int
    downtime_s: float
    replayed_steps: int
    replayed_positions: int
    replay_s: float
    session_id: str


FailoverEvent = Union[Reconnecting, Resumed]  # noqa: UP007 - a runtime alias on Python 3.10
OnReconnect = Callable[[FailoverEvent], None]
"""Called on the thread that steps the session (a TUI posts it to the UI thread)."""


class FailoverGaveUp(DaemonUnreachable):
    """The stream broke and no daemon took the session back before the deadline."""


class FailoverCancelled(SplitlmError):
    """``cancel`` was called while the session was reconnecting."""


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` means the stream broke (worth a reconnect), not a refusal."""
    if isinstance(exc, DaemonUnreachable):
        return True
    return isinstance(exc, TrunkError) and exc.code in TRANSIENT_CODES


def describe(exc: BaseException) -> str:
    """One short line for a notice: the gRPC detail, without the how-to-start-a-daemon advice."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, DaemonUnreachable) and "): " in text:
        text = text.split("): ", 1)[1]  # "no trunk daemon answers at ADDR (from SRC): DETAIL"
    return text if len(text) <= 120 else text[:117] + "..."


@dataclass(frozen=True)
class RecordedStep:
    """One step as it was sent: hidden states for ``[position, position + length)``."""

    position: int
    length: int
    hidden: pb.Tensor


class StepHistory:
    """The steps that built a session's trunk cache, in order, without those a rollback erased.

    A step at position ``p`` truncates the cache to ``p`` before it runs, so every earlier step
    that started at ``p`` or later no longer counts and is dropped. A step that started before
    ``p`` and reached past it stays whole: replaying it and then the step at ``p`` (which rolls
    back again) gives the same cache as the original run did.
    """

    def __init__(self) -> None:
        self._steps: list[RecordedStep] = []

    def record(self, position: int, hidden: pb.Tensor) -> list[RecordedStep]:
        """Add a step about to be sent; returns the steps it erased (for ``undo``)."""
        erased = []
        while self._steps and self._steps[-1].position >= position:
            erased.append(self._steps.pop())
        self._steps.append(RecordedStep(position, int(hidden.shape[1]), hidden))
        return erased

    def undo(self, erased: list[RecordedStep]) -> None:
        """Forget the last step recorded (the daemon refused it) and put back what it erased."""
        self._steps.pop()
        self._steps.extend(reversed(erased))

    @property
    def steps(self) -> Sequence[RecordedStep]:
        return tuple(self._steps)

    @property
    def positions(self) -> int:
        """Positions a replay computes (more than the cached length after a partial rollback)."""
        return sum(s.length for s in self._steps)

    @property
    def nbytes(self) -> int:
        """Memory held by the recorded hidden states."""
        return sum(len(s.hidden.data) for s in self._steps)

    def __len__(self) -> int:
        return len(self._steps)


class FailoverSession:
    """A trunk session that outlives its stream; a ``RemoteSession`` like ``TrunkStream``.

    Every step is recorded before it is sent. When a step fails with a transient error the
    session reopens (backoff and jitter, within ``policy.deadline_s``), replays the history
    pipelined (the failed step last) and returns that step's reply as if nothing had happened.
    Step ids restart at 1 on every new stream; the daemon applies each id of a stream once.

    Not thread-safe: one thread steps a session at a time; ``cancel`` may come from any thread.

    Args:
        stream: the open session to start from.
        reopen: opens a new session on the same daemon and plan; its argument bounds the wait
            for the daemon's answer, in seconds.
        policy: backoff and deadline.
        on_reconnect: told of each attempt and of the resume.
        rng: the jitter's source (seeded in tests).
        retry_at_once: make the first attempt without waiting (a replica set: another replica
            is most likely up, and gRPC's round_robin hands the reopen to it); the backoff
            applies from the second attempt on.
    """

    def __init__(
        self,
        stream: TrunkStream,
        reopen: Callable[[float], TrunkStream],
        policy: RetryPolicy,
        on_reconnect: OnReconnect | None = None,
        rng: random.Random | None = None,
        *,
        retry_at_once: bool = False,
    ) -> None:
        self._stream = stream
        self.retry_at_once = retry_at_once
        self._reopen = reopen
        self.policy = policy
        self.on_reconnect = on_reconnect
        self.history = StepHistory()
        self.resumes: list[Resumed] = []
        self._rng = rng or random.Random()
        self._cancel = threading.Event()
        self._bytes_sent_before = 0
        self._bytes_received_before = 0

    @property
    def wire_dtype(self) -> torch.dtype:
        return self._stream.wire_dtype

    @property
    def session_id(self) -> str:
        return self._stream.session_id

    @property
    def rollback_floor(self) -> int:
        """See ``TrunkStream.rollback_floor``; a replay rebuilds the same floor."""
        return self._stream.rollback_floor

    @property
    def bytes_sent(self) -> int:
        return self._bytes_sent_before + self._stream.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self._bytes_received_before + self._stream.bytes_received

    def step(self, hidden: torch.Tensor, position: int) -> tuple[torch.Tensor, float]:
        """Send hidden states ``(1, t, H)`` for ``[position, position + t)``, resuming on a break.

        Returns:
            The trunk's output ``(1, t, H)`` and the daemon's compute time in seconds.

        Raises:
            TrunkError: the daemon refused the step or the resumed session (not retried).
            FailoverGaveUp: no daemon took the session back within the deadline.
            FailoverCancelled: ``cancel`` was called while reconnecting.
        """
        tensor = codec.encode(hidden, self._stream.wire_dtype)
        erased = self.history.record(position, tensor)
        try:
            result = self._stream.step_tensor(tensor, position)
        except StepRefused:
            self.history.undo(erased)  # not run: the cache is what the history said before
            raise
        except SplitlmError as e:
            if not is_transient(e):
                raise
            result = self._resume(e)
        return codec.decode(result.hidden), result.compute_us / 1e6

    def _resume(self, error: SplitlmError) -> pb.StepResult:
        broke = time.monotonic()
        log.info("session %s broke: %s; reconnecting", self._stream.session_id, describe(error))
        self._retire(self._stream)
        last, stalled = describe(error), isinstance(error, StepDeadlineExceeded)
        delays = self.policy.delays(self._rng)
        if self.retry_at_once:
            delays = itertools.chain([0.0], delays)
        for attempt, delay in enumerate(delays, start=1):
            elapsed = time.monotonic() - broke
            if elapsed + delay > self.policy.deadline_s:
                raise self._gave_up(attempt - 1, last, stalled)
            self._notify(Reconnecting(attempt, delay, last, elapsed, self.policy.deadline_s))
            if self._cancel.wait(delay):
                raise FailoverCancelled("cancelled while reconnecting to the trunk daemon")
            try:
                stream = self._reopen(self._remaining(broke))
            except SplitlmError as e:
                if not is_transient(e):
                    raise
                last, stalled = describe(e), stalled or isinstance(e, StepDeadlineExceeded)
                continue
            t0 = time.monotonic()
            try:
                results = stream.replay(
                    [(s.hidden, s.position) for s in self.history.steps],
                    timeout_s=self._remaining(broke),
                )
            except SplitlmError as e:
                self._retire(stream)
                if not is_transient(e):
                    raise
                last, stalled = describe(e), stalled or isinstance(e, StepDeadlineExceeded)
                continue
            self._stream = stream
            done = time.monotonic()
            event = Resumed(
                attempt,
                done - broke,
                len(results),
                self.history.positions,
                done - t0,
                stream.session_id,
            )
            log.info(
                "session resumed as %s after %.1f s: replayed %d steps, %d positions in %.0f ms",
                stream.session_id,
                event.downtime_s,
                event.replayed_steps,
                event.replayed_positions,
                event.replay_s * 1e3,
            )
            self.resumes.append(event)
            self._notify(event)
            return results[-1]
        raise AssertionError("unreachable: delays() is endless")  # pragma: no cover

    def _gave_up(self, attempts: int, last: str, stalled: bool) -> FailoverGaveUp:
        """The error when the retry deadline ran out; names the step deadline when a stalled
        daemon (not only a missing one) was part of why, and the setting that raises each."""
        text = (
            f"lost the trunk daemon and it did not take the session back within "
            f"{self.policy.deadline_s:.0f} s ({attempts} attempts; last error: {last}); "
            "--retry-deadline sets how long to wait"
        )
        if stalled:
            deadline = self._stream.clock.deadline
            text += (
                f"; the daemon stopped answering steps within the step deadline "
                f"({deadline.explain()}): a daemon that is slow rather than stuck needs a "
                "larger --step-deadline"
            )
        return FailoverGaveUp(text)

    def _remaining(self, broke: float) -> float:
        """What is left of the deadline: every wait of a resume (open, replay) is bounded by it,
        so a daemon that accepts the stream and never answers cannot hang the client."""
        return max(0.05, self.policy.deadline_s - (time.monotonic() - broke))

    def _retire(self, stream: TrunkStream) -> None:
        """Close a dead stream, keeping its byte counts in the totals."""
        stream.close()
        self._bytes_sent_before += stream.bytes_sent
        self._bytes_received_before += stream.bytes_received
        stream.bytes_sent = stream.bytes_received = 0

    def _notify(self, event: FailoverEvent) -> None:
        if self.on_reconnect is not None:
            self.on_reconnect(event)

    def cancel(self) -> None:
        """Stop a reconnect in progress (any thread): the stepping thread gets
        ``FailoverCancelled``."""
        self._cancel.set()

    def close(self) -> None:
        self._cancel.set()
        self._stream.close()
