"""The failover's plain parts, without a daemon: backoff, the step history, what is retried."""

from __future__ import annotations

import random

import pytest

from splitlm.protos import trunk_pb2 as pb
from splitlm.shared.errors import DaemonUnreachable, InvalidStep, TrunkError, UsageError
from splitlm.shared.failover import RetryPolicy, StepHistory, describe, is_transient


class TestRetryPolicy:
    def test_default_waits_at_least_two_minutes(self) -> None:
        assert RetryPolicy().deadline_s >= 120 and RetryPolicy().enabled
        assert not RetryPolicy(deadline_s=0).enabled

    def test_delays_grow_to_the_cap_with_bounded_jitter(self) -> None:
        p = RetryPolicy(initial_delay_s=0.5, max_delay_s=4.0, multiplier=2.0, jitter=0.5)
        gen = p.delays(random.Random(1))
        delays = [next(gen) for _ in range(8)]
        bases = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0, 4.0]
        assert all(b * 0.5 <= d <= b for d, b in zip(delays, bases))
        # jitter: two clients that lost the same daemon do not come back in step
        other = p.delays(random.Random(2))
        assert delays != [next(other) for _ in range(8)]

    @pytest.mark.parametrize(
        ("kwargs", "flag"),
        [
            ({"initial_delay_s": 0}, "--retry-initial"),
            ({"initial_delay_s": 3, "max_delay_s": 2}, "--retry-max-delay"),
            ({"deadline_s": -1}, "--retry-deadline"),
            ({"jitter": 1.5}, "jitter"),
            ({"multiplier": 0.5}, "multiplier"),
        ],
    )
    def test_bad_values_name_the_option(self, kwargs: dict[str, float], flag: str) -> None:
        with pytest.raises(UsageError, match=flag):
            RetryPolicy(**kwargs)


def _t(n: int) -> pb.Tensor:
    return pb.Tensor(dtype=pb.FLOAT32, shape=[1, n, 2], data=bytes(8 * n))


class TestStepHistory:
    def test_steps_in_order(self) -> None:
        h = StepHistory()
        h.record(0, _t(5))
        h.record(5, _t(1))
        h.record(6, _t(1))
        assert [(s.position, s.length) for s in h.steps] == [(0, 5), (5, 1), (6, 1)]
        assert h.positions == 7 and h.nbytes == 7 * 8

    def test_a_rollback_drops_the_steps_it_erases(self) -> None:
        h = StepHistory()
        for pos, n in [(0, 5), (5, 1), (6, 1), (7, 1)]:
            h.record(pos, _t(n))
        h.record(6, _t(2))  # back to 6: the steps at 6 and 7 no longer count
        assert [(s.position, s.length) for s in h.steps] == [(0, 5), (5, 1), (6, 2)]
        h.record(3, _t(1))  # into the prompt chunk: it stays whole; the step at 3 rolls back again
        assert [(s.position, s.length) for s in h.steps] == [(0, 5), (3, 1)]
        assert h.positions == 6
        h.record(0, _t(4))
        assert [(s.position, s.length) for s in h.steps] == [(0, 4)]


class TestWhatIsRetried:
    @pytest.mark.parametrize("code", ["UNAVAILABLE", "CANCELLED", "ABORTED"])
    def test_a_broken_stream_is(self, code: str) -> None:
        assert is_transient(TrunkError(code, "x"))

    def test_no_daemon_is(self) -> None:
        assert is_transient(
            DaemonUnreachable(
                "no trunk daemon answers at unix:/x (from --trunk): gone\n  start one"
            )
        )

    @pytest.mark.parametrize(
        "code",
        [
            "FAILED_PRECONDITION",
            "INVALID_ARGUMENT",
            "RESOURCE_EXHAUSTED",
            "OUT_OF_RANGE",
            "ALREADY_EXISTS",
            "UNAUTHENTICATED",
            "INTERNAL",
        ],
    )
    def test_a_refusal_is_not(self, code: str) -> None:
        assert not is_transient(TrunkError(code, "x"))

    def test_other_errors_are_not(self) -> None:
        assert not is_transient(InvalidStep("bad"))
        assert not is_transient(ValueError("bad"))

    def test_notice_text_is_one_short_line(self) -> None:
        e = DaemonUnreachable(
            "no trunk daemon answers at unix:/x (from --trunk): Socket closed\n  start one: ..."
        )
        assert describe(e) == "Socket closed"
        assert len(describe(TrunkError("UNAVAILABLE", "y" * 500))) <= 120


def test_history_undo_restores_what_a_refused_step_erased() -> None:
    """A step the daemon refuses (``StepRefused``) ran nowhere: the history goes back to what
    the daemon's cache holds, including the steps that step's rollback would have erased."""
    h = StepHistory()
    for position, t in [(0, 5), (5, 1), (6, 1), (7, 1)]:
        h.record(position, _t(t))
    erased = h.record(6, _t(3))  # a rollback to 6
    assert [s.position for s in h.steps] == [0, 5, 6] and len(erased) == 2
    h.undo(erased)
    assert [(s.position, s.length) for s in h.steps] == [(0, 5), (5, 1), (6, 1), (7, 1)]
