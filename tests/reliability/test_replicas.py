"""Replica sets with real daemons: gRPC's round_robin and health checking place new sessions; a
session moves to another replica by replay when its own dies; a replica that refuses a session
or is drained gets none.

Sessions per replica are counted with each replica's own ``Info`` (``sessions_open``).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from splitlm.shared import prepare
from splitlm.shared.client import TrunkClient, replica_target
from splitlm.shared.errors import TrunkError
from splitlm.shared.failover import FailoverSession, Reconnecting, Resumed, RetryPolicy
from splitlm.shared.generation import SplitPipeline
from tests.conftest import Daemon, save_tiny, start_daemon

from .helpers import (
    FAST_RETRY,
    PROMPT,
    Models,
    Recording,
    TokenEvent,
    connect,
    reply_with_its_replica_killed,
    run_ids,
    sessions_per_replica,
    wait_until,
)

SPLIT = ("--split", "2:4")
log = logging.getLogger(__name__)



@pytest.fixture(scope="module")
def three(tiny_models: Models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Daemon]]:
    """Three replicas of the tiny llama's trunk, shared by the tests that kill none."""
    root = tmp_path_factory.mktemp("replicas")
    made: list[Daemon] = []
    try:
        for i in range(3):
            made.append(start_daemon(tiny_models["llama"], f"unix:{root / f'r{i}.sock'}", root / f"r{i}.log", *SPLIT))
        yield made
    finally:
        for d in made:
            d.stop()


def test_round_robin_spreads_new_sessions_over_the_replicas(three: list[Daemon], tiny_models: Models) -> None:
    split = connect(replica_target([d.address for d in three]), tiny_models["llama"])
    assert split.client.replicas and split.client.replica_count == 3
    pipes = [split.pipeline() for _ in range(6)]
    try:
        got = sessions_per_replica(three)
        log.info("6 sessions over 3 replicas: %s", got)
        assert sum(got) == 6
        assert min(got) >= 1 and max(got) <= 3, got  # pick_first would put all 6 on one
    finally:
        for p in pipes:
            p.close()
        split.close()
    wait_until(lambda: sessions_per_replica(three) == [0, 0, 0], what="sessions closed")


def test_a_drained_replica_gets_no_new_sessions_while_its_own_go_on(
    three: list[Daemon], tiny_models: Models
) -> None:
    """SIGUSR1 turns replica 1's health NOT_SERVING: round_robin leaves it out of new sessions,
    and the session it holds keeps stepping; SIGUSR2 brings it back."""
    model = tiny_models["llama"]
    held = connect(three[1].address, model)
    split = connect(replica_target([d.address for d in three]), model)
    own = Recording(held.pipeline())
    pipes: list[SplitPipeline] = []
    try:
        run_ids(own, PROMPT, 3)
        three[1].proc.send_signal(signal.SIGUSR1)
        # Info through the set: only replica 1 holds a session, so an answer of 1 came from it;
        # once six in a row answer 0, the channel's health watch has taken it out
        wait_until(
            lambda: all(split.client.info().sessions_open == 0 for _ in range(6)),
            what="the drained replica out of the rotation",
        )
        pipes = [split.pipeline() for _ in range(6)]
        got = sessions_per_replica(three)
        assert got[1] == 1 and got[0] + got[2] == 6, got  # only its own session
        run_ids(own, PROMPT, 3)  # the drained replica still serves its own session
        three[1].proc.send_signal(signal.SIGUSR2)
        wait_until(
            lambda: any(split.client.info().sessions_open == 1 for _ in range(6)),
            what="the replica back in the rotation",
        )
        assert "draining (SIGUSR1)" in three[1].log.read_text()
    finally:
        for p in pipes:
            p.close()
        own.close()
        held.close()
        split.close()
    wait_until(lambda: sessions_per_replica(three) == [0, 0, 0], what="sessions closed")


def test_replicas_that_refuse_sessions_pass_them_on_or_fail_clearly(
    three: list[Daemon], tiny_models: Models, tmp_path: Path
) -> None:
    """Replica A's session table is full (RESOURCE_EXHAUSTED), replica B serves other weights
    (FAILED_PRECONDITION), C takes sessions: through the set every new session lands on C; with
    only A and B the open fails at once, naming both refusals."""
    model = tiny_models["llama"]
    other = save_tiny("llama", tmp_path / "other", seed=1)
    made: list[Daemon] = []
    try:
        for name, m, extra in (("a", model, ("--max-sessions", "1")), ("b", other, ())):
            made.append(start_daemon(m, f"unix:{tmp_path / f'{name}.sock'}", tmp_path / f"{name}.log", *SPLIT, *extra))
        a, b = made
        c = three[0]
        on_c = connect(c.address, model)  # the plan the sessions are for
        on_a = connect(a.address, model)
        filler = on_a.pipeline()  # fills A's one slot
        every = TrunkClient(replica_target([a.address, b.address, c.address]))
        every.info()  # as a front end does before it opens a session
        pipes = [prepare.split_pipeline(on_c.parts, every, retry=FAST_RETRY) for _ in range(4)]
        try:
            assert sessions_per_replica([a, b, c]) == [1, 0, 4]
        finally:
            for p in pipes:
                p.close()
            every.close()
        a_and_b = TrunkClient(replica_target([a.address, b.address]))
        try:
            with pytest.raises(TrunkError) as refused:
                prepare.split_pipeline(on_c.parts, a_and_b, retry=FAST_RETRY)
            assert "no replica took the session: 4 tries" in str(refused.value)
            assert "RESOURCE_EXHAUSTED" in str(refused.value) and "FAILED_PRECONDITION" in str(refused.value)
        finally:
            a_and_b.close()
        filler.close()
        on_a.close()
        on_c.close()
    finally:
        for d in made:
            d.stop()
    wait_until(lambda: sessions_per_replica(three) == [0, 0, 0], what="sessions closed")


def test_kill9_of_the_replica_holding_a_session_moves_it_token_identical(
    three: list[Daemon], tiny_models: Models
) -> None:
    """One of three replicas is SIGKILLed mid-reply and not restarted: the session moves to
    another at the first attempt, without a backoff wait, and every step's logits equal an
    uninterrupted run's bit for bit. Last in the file: it kills one of the module's replicas."""
    events: list[object] = []
    n, kill_at = 30, 9
    moved = reply_with_its_replica_killed(
        three, replica_target([d.address for d in three]), tiny_models["llama"], n, kill_at,
        RetryPolicy(), events.append,  # the default backoff
    )
    assert moved.identical(), "the reply or a step's logits differ after moving replicas"
    assert len(moved.session.resumes) == 1
    resumed = moved.session.resumes[0]
    attempts = [e for e in events if isinstance(e, Reconnecting)]
    assert resumed.attempts == 1 and attempts[0].delay_s == 0.0  # round_robin had another READY
    assert resumed.replayed_steps == kill_at + 2
    assert moved.survivor_sessions == 1
    log.info(
        "replica %d of 3 killed after token %d: moved in %.0f ms (replay of %d steps, %.0f ms)",
        moved.victim, kill_at, resumed.downtime_s * 1e3, resumed.replayed_steps, resumed.replay_s * 1e3,
    )
    assert [e for e in events if isinstance(e, Resumed)] == [resumed]


def test_sigterm_of_the_replica_holding_a_session_moves_it_and_the_reply_is_identical(
    three: list[Daemon], tiny_models: Models
) -> None:
    """A replica stopping on SIGTERM turns NOT_SERVING and ends the session it holds after its
    step (UNAVAILABLE "daemon shutting down"); the session moves to a live replica by replay and
    the reply equals an uninterrupted run. Runs after the kill -9 test: two replicas are left."""
    model = tiny_models["llama"]
    live = [d for d in three if d.proc.poll() is None]
    assert len(live) >= 2
    n, stop_at = 20, 6
    ref_split = connect(live[0].address, model)
    ref = Recording(ref_split.pipeline())
    want = run_ids(ref, PROMPT, n)
    ref.close()
    ref_split.close()
    wait_until(lambda: sessions_per_replica(live) == [0] * len(live), what="the reference session closed")

    split = connect(replica_target([d.address for d in three]), model)
    stopped: list[Daemon] = []

    def on_token(ev: TokenEvent) -> None:
        if ev.index == stop_at:
            holder = live[sessions_per_replica(live).index(1)]
            holder.proc.send_signal(signal.SIGTERM)
            holder.proc.wait(60)
            stopped.append(holder)

    pipe = Recording(split.pipeline(FAST_RETRY))
    try:
        got = run_ids(pipe, PROMPT, n, on_token=on_token)
        assert got.token_ids == want.token_ids
        assert all(torch.equal(a, b) for a, b in zip(pipe.logits, ref.logits))
        session = pipe.inner.session
        assert isinstance(session, FailoverSession) and len(session.resumes) == 1
        assert stopped[0].proc.returncode == 0  # a clean stop, not a crash
        assert "stopping: 1 sessions open" in stopped[0].log.read_text()
        assert sum(sessions_per_replica([d for d in live if d is not stopped[0]])) == 1
    finally:
        pipe.close()
        split.close()
