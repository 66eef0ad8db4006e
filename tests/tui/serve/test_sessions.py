"""The session pool's choices, without a daemon: which kept session a request gets, where it
starts stepping, what is evicted. A session here is the real ``TokenLog`` a pipeline keeps, on a
stand-in pipeline that only records whether it was closed."""

from __future__ import annotations

from typing import Any

from splitlm.shared.generation import TokenLog
from splitlm.tui.serve.sessions import Kept, SessionPool, common_prefix


class Pipe:
    def __init__(self) -> None:
        self.tokens = TokenLog()
        self.closed = False

    def close(self) -> None:
        self.closed = True


def pool(max_sessions: int = 4, keep_bytes: int = 10**6) -> tuple[SessionPool, list[Pipe]]:
    opened: list[Pipe] = []

    def open_session() -> Kept:
        opened.append(Pipe())
        return Kept(opened[-1])  # type: ignore[arg-type]  # only .tokens and .close are used

    return SessionPool(open_session, max_sessions, keep_bytes, bytes_per_position=10), opened


def serve(p: SessionPool, ids: list[int], held_after: list[int]) -> Any:
    """Acquire for ``ids``, let the session hold ``held_after`` (as a reply would), release."""
    lease = p.acquire(ids)
    lease.session.pipeline.tokens.ran(held_after[lease.start:], lease.start)
    p.release(lease.session, keep=True)
    return lease


SYSTEM = [1, 2, 3]


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2 and common_prefix([], [1]) == 0 and common_prefix([5], [5]) == 1


def test_a_next_turn_extends_its_conversation_and_another_gets_its_own() -> None:
    p, opened = pool()
    a1 = SYSTEM + [10, 11, 12, 13]
    first = serve(p, a1, a1 + [20, 21])
    assert first.fresh and first.start == 0
    b1 = SYSTEM + [30, 31, 32, 33]
    other = serve(p, b1, b1 + [40])  # shares only the system prompt: a new session
    assert other.fresh and len(opened) == 2
    a2 = a1 + [20, 21, 22, 50, 51]
    turn2 = serve(p, a2, a2)
    assert not turn2.fresh and turn2.start == len(a1) + 2 and turn2.session.pipeline is opened[0]
    edited = a1 + [20, 99]  # the last turn edited: rolled back to where it agrees
    again = p.acquire(edited)
    assert again.session.pipeline is opened[0] and again.start == len(a1) + 1
    p.release(again.session, keep=False)
    assert opened[0].closed and p.stats().kept == 1


def test_at_capacity_the_least_recently_used_is_taken_and_bytes_evict() -> None:
    p, opened = pool(max_sessions=2)
    serve(p, [1, 2, 3], [1, 2, 3])
    serve(p, [7, 8, 9], [7, 8, 9])
    lease = p.acquire([50, 51])  # nothing shared, no room: the oldest, rolled back to 0
    assert not lease.fresh and lease.start == 0 and lease.session.pipeline is opened[0]
    p.release(lease.session, keep=True)
    small, opened2 = pool(keep_bytes=55)  # room for 5 positions of 10 bytes
    serve(small, [1, 2, 3], [1, 2, 3])
    serve(small, [7, 8, 9], [7, 8, 9])
    assert small.stats().kept == 1 and opened2[0].closed and small.stats().evicted == 1
