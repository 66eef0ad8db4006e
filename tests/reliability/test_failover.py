"""Failure table, row 1: kill -9 the daemon mid-reply and start it again; the reply completes and
equals an uninterrupted run. Plus what failover must not do: retry a refusal, wait forever, or
apply a step twice."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import torch

from splitlm.protos import trunk_pb2_grpc as pb_grpc
from splitlm.shared.errors import TrunkError
from splitlm.shared.failover import (
    FailoverGaveUp,
    FailoverSession,
    Reconnecting,
    Resumed,
    RetryPolicy,
)
from splitlm.shared.generation import SplitPipeline
from tests.conftest import Daemon, start_daemon

from .helpers import (
    FAST_RETRY,
    PROMPT,
    Factory,
    Models,
    Recording,
    TokenEvent,
    connect,
    hidden_tensor,
    open_request,
    plan_of,
    run_ids,
    scaled,
    sessions_open,
    step_request,
    wait_until,
)

SPLIT = ("--split", "2:4")
log = logging.getLogger(__name__)


def _restart_later(
    model: Path, d: Daemon, log: Path, delay_s: float, box: dict[str, Daemon]
) -> threading.Thread:
    """Start a new daemon on ``d``'s address after ``delay_s`` (the client meanwhile retries)."""

    def run() -> None:
        time.sleep(delay_s)
        box["daemon"] = start_daemon(model, d.address, log, *SPLIT)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("kind", ["gemma2"])
def test_kill9_mid_reply_resumes_bit_identical(
    tiny_models: Models, daemon_factory: Factory, tmp_path: Path, kind: str
) -> None:
    """The daemon is SIGKILLed after token 9 of 40 and restarted 1 s later: the generation goes on
    by itself, and every step's logits equal the uninterrupted run's bit for bit (so the tokens
    do too). Gemma 2 has sliding-window layers, whose cache a one-shot prefill would not rebuild
    the same way."""
    model = tiny_models[kind]
    d = daemon_factory(model, *SPLIT)
    n, kill_at = scaled(40, 200), 9
    split = connect(d.address, model)
    ref = Recording(split.pipeline())
    want = run_ids(ref, PROMPT, n)
    ref.close()

    events: list[object] = []
    box: dict[str, Daemon] = {}
    restarts: list[threading.Thread] = []

    def on_token(ev: TokenEvent) -> None:
        if ev.index == kill_at:
            d.proc.kill()
            d.proc.wait()
            restarts.append(_restart_later(model, d, tmp_path / "restarted.log", 1.0, box))

    pipe = Recording(split.pipeline(FAST_RETRY, events.append))
    try:
        got = run_ids(pipe, PROMPT, n, on_token=on_token)
        restarts[0].join()
        session = pipe.inner.session
        assert isinstance(session, FailoverSession)
        assert got.token_ids == want.token_ids
        assert len(pipe.logits) == len(ref.logits) == n
        for i, (a, b) in enumerate(zip(pipe.logits, ref.logits)):
            assert torch.equal(a, b), f"step {i} differs after the failover"
        resumed = [e for e in events if isinstance(e, Resumed)]
        assert len(resumed) == 1 and len(session.resumes) == 1
        # the prompt chunk plus one step per token up to the interrupted one, all sent again
        assert resumed[0].replayed_steps == kill_at + 2
        assert resumed[0].replayed_positions == len(PROMPT) + kill_at + 1
        attempts = [e for e in events if isinstance(e, Reconnecting)]
        assert attempts and attempts[0].attempt == 1 and events[-1] is resumed[0]
        assert all(e.delay_s <= FAST_RETRY.max_delay_s for e in attempts)
        # the new daemon holds exactly one session: the resumed one
        assert sessions_open(d.address) == 1
        log.info(
            "kill -9 after token %d of %d (tiny %s, restart 1 s later): resumed after %d "
            "attempts, downtime %.1f s, replay of %d steps / %d positions %.0f ms; "
            "all %d steps' logits bit-identical",
            kill_at, n, kind, resumed[0].attempts, resumed[0].downtime_s,
            resumed[0].replayed_steps, resumed[0].replayed_positions,
            resumed[0].replay_s * 1e3, n,
        )
    finally:
        pipe.close()
        split.close()
        if "daemon" in box:
            assert box["daemon"].stop() == 0


def test_failover_after_a_rollback_replays_what_the_cache_holds(
    tiny_models: Models, daemon_factory: Factory, tmp_path: Path
) -> None:
    """Regenerate from an earlier position (the cache rolls back), then lose the daemon: the
    replay leaves out the erased steps and the continuation still equals an uninterrupted run."""
    model = tiny_models["qwen2"]
    d = daemon_factory(model, *SPLIT)
    split = connect(d.address, model)

    def conversation(
        pipe: SplitPipeline, on_token: Callable[[TokenEvent], None] | None = None
    ) -> tuple[list[int], list[int]]:
        first = run_ids(pipe, PROMPT, 12)
        # go back into the first reply and continue from its 4th token with another prompt
        back = len(PROMPT) + 4
        second = run_ids(pipe, [7, 8, 9], 16, on_token=on_token, start_position=back)
        return first.token_ids, second.token_ids

    ref = split.pipeline()
    want = conversation(ref)
    ref.close()
    box: dict[str, Daemon] = {}
    restarts: list[threading.Thread] = []

    def on_token(ev: TokenEvent) -> None:
        if ev.index == 5:
            d.proc.kill()
            d.proc.wait()
            restarts.append(_restart_later(model, d, tmp_path / "restarted.log", 0.2, box))

    pipe = split.pipeline(FAST_RETRY)
    try:
        assert conversation(pipe, on_token) == want
        restarts[0].join()
        session = pipe.session
        assert isinstance(session, FailoverSession)
        # kept: the prompt chunk and the first reply's steps that start below the rollback point
        # (positions 20-23); then the new prompt chunk, 5 tokens, and the interrupted step
        assert session.resumes[0].replayed_steps == 1 + 4 + 1 + 5 + 1
    finally:
        pipe.close()
        split.close()
        if "daemon" in box:
            box["daemon"].stop()


def test_a_refusal_after_the_restart_is_not_retried(
    tiny_models: Models, daemon_factory: Factory, tmp_path: Path
) -> None:
    """The daemon comes back with another split: FAILED_PRECONDITION surfaces at once (one
    attempt reached it), instead of retrying until the deadline."""
    model = tiny_models["llama"]
    d = daemon_factory(model, *SPLIT)
    split = connect(d.address, model)
    events: list[object] = []
    pipe = split.pipeline(
        RetryPolicy(initial_delay_s=0.05, max_delay_s=0.2, deadline_s=120), events.append
    )
    other: Daemon | None = None
    try:
        run_ids(pipe, PROMPT, 3)
        d.proc.kill()
        d.proc.wait()
        other = start_daemon(model, d.address, tmp_path / "other.log", "--split", "3:5")
        t0 = time.monotonic()
        with pytest.raises(TrunkError) as info:
            run_ids(pipe, [5], 3, start_position=len(PROMPT) + 2)
        assert info.value.code == "FAILED_PRECONDITION"
        assert time.monotonic() - t0 < 30
        assert [type(e) for e in events] == [Reconnecting]
    finally:
        pipe.close()
        split.close()
        if other is not None:
            other.stop()


def test_gives_up_at_the_deadline(tiny_models: Models, daemon_factory: Factory) -> None:
    """No daemon comes back: the client stops retrying at its deadline with a clear error."""
    model = tiny_models["llama"]
    d = daemon_factory(model, *SPLIT)
    split = connect(d.address, model)
    events: list[object] = []
    policy = RetryPolicy(initial_delay_s=0.1, max_delay_s=0.4, deadline_s=2.0)
    pipe = split.pipeline(policy, events.append)
    try:
        run_ids(pipe, PROMPT, 2)
        d.proc.kill()
        d.proc.wait()
        t0 = time.monotonic()
        with pytest.raises(FailoverGaveUp, match="within 2 s") as gave_up:
            run_ids(pipe, [5], 2, start_position=len(PROMPT) + 1)
        took = time.monotonic() - t0
        assert 1.0 < took < 2.0 + 5.0
        attempts = [e for e in events if isinstance(e, Reconnecting)]
        assert len(attempts) >= 4
        assert [e.attempt for e in attempts] == list(range(1, len(attempts) + 1))
        assert all(e.elapsed_s + e.delay_s <= policy.deadline_s for e in attempts)
        assert "--retry-deadline" in str(gave_up.value)
    finally:
        pipe.close()
        split.close()


def test_a_slow_restart_is_seen_within_the_retry_delay(
    tiny_models: Models, daemon_factory: Factory, tmp_path: Path
) -> None:
    """The daemon comes back only after 30 s (a large model reloading): the session resumes
    within the failover's own max delay of the daemon answering again. gRPC's channel backs off
    up to 120 s between connection attempts by default; the client caps that at 2 s, or a
    reconnect loop fails fast for a minute more against a daemon that is already up."""
    model = tiny_models["llama"]
    d = daemon_factory(model, *SPLIT)
    split = connect(d.address, model)
    policy = RetryPolicy(initial_delay_s=0.25, max_delay_s=2.0, deadline_s=120.0)
    pipe = split.pipeline(policy)
    box: dict[str, Daemon] = {}
    try:
        run_ids(pipe, PROMPT, 2)
        d.proc.kill()
        d.proc.wait()
        ready: list[float] = []

        def restart() -> None:
            time.sleep(scaled(30, 75))
            box["daemon"] = start_daemon(model, d.address, tmp_path / "restarted.log", *SPLIT)
            ready.append(time.monotonic())

        thread = threading.Thread(target=restart, daemon=True)
        thread.start()
        run_ids(pipe, [5], 2, start_position=len(PROMPT) + 1)
        resumed_at = time.monotonic()
        thread.join()
        session = pipe.session
        assert isinstance(session, FailoverSession) and len(session.resumes) == 1
        # the step resumed at most one retry delay (plus a loaded machine's slack) after the
        # daemon answered Info on a fresh channel
        lag = resumed_at - ready[0]
        log.info("resume %.1f s after the restarted daemon answered (downtime %.1f s)",
                 lag, session.resumes[0].downtime_s)
        assert lag < policy.max_delay_s + 4.0, f"resumed {lag:.1f} s after the daemon was back"
    finally:
        pipe.close()
        split.close()
        if "daemon" in box:
            assert box["daemon"].stop() == 0


class _SilentTrunk(pb_grpc.TrunkServicer):
    """A gRPC server on a real socket that takes Session streams and never answers them: a
    daemon wedged after accepting (the real one cannot be made to do that on purpose)."""

    def __init__(self) -> None:
        self.requests = 0

    def Session(self, request_iterator, context):  # type: ignore[no-untyped-def]  # noqa: N802
        for _ in request_iterator:  # until the client cancels the stream
            self.requests += 1
        return
        yield


def test_a_daemon_that_never_answers_cannot_hang_the_resume(
    tiny_models: Models, daemon_factory: Factory
) -> None:
    """Every wait of a resume (the open, the replay) is bounded by the failover deadline: a new
    daemon that accepts the stream and stays silent makes the client give up at the deadline
    with the reason, instead of blocking forever (the kill -9 flake's worst case)."""
    from concurrent.futures import ThreadPoolExecutor

    from splitlm.daemon.server import prepare_unix_socket

    model = tiny_models["llama"]
    d = daemon_factory(model, *SPLIT)
    split = connect(d.address, model)
    policy = RetryPolicy(initial_delay_s=0.1, max_delay_s=0.4, deadline_s=3.0)
    pipe = split.pipeline(policy)
    silent = _SilentTrunk()
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_TrunkServicer_to_server(silent, server)
    try:
        run_ids(pipe, PROMPT, 2)
        d.proc.kill()
        d.proc.wait()
        prepare_unix_socket(d.address)
        assert server.add_insecure_port(d.address)
        server.start()
        t0 = time.monotonic()
        with pytest.raises(FailoverGaveUp, match="no reply within"):
            run_ids(pipe, [5], 2, start_position=len(PROMPT) + 1)
        took = time.monotonic() - t0
        assert silent.requests >= 1, "the resume never reached the silent daemon"
        assert took < policy.deadline_s + 3.0
    finally:
        pipe.close()
        split.close()
        server.stop(0)


class TestStepIds:
    """The step-id rule: within a session ids start at 1 and increase, so a step sent twice is
    refused, never applied twice; a new session starts again at 1."""

    def _stream(self, address: str, requests: list) -> list:  # type: ignore[type-arg]
        with grpc.insecure_channel(address) as ch:
            return list(pb_grpc.TrunkStub(ch).Session(iter(requests), timeout=30))

    def test_duplicate_and_lower_ids_are_refused(
        self, tiny_models: Models, daemon_factory: Factory
    ) -> None:
        d = daemon_factory(tiny_models["llama"], *SPLIT)
        p = plan_of(d.address)
        # ids may skip; each applies once
        replies = self._stream(
            d.address,
            [
                open_request(p),
                step_request(1, 0, hidden_tensor(3)),
                step_request(5, 3, hidden_tensor(1)),
            ],
        )
        assert [r.result.step_id for r in replies[1:]] == [1, 5]
        for ids in ([1, 1], [4, 2]):
            with pytest.raises(grpc.RpcError) as info:
                self._stream(
                    d.address,
                    [
                        open_request(p),
                        step_request(ids[0], 0, hidden_tensor(3)),
                        step_request(ids[1], 0, hidden_tensor(3)),
                    ],
                )
            assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
            assert "applied once" in (info.value.details() or "")
        with pytest.raises(grpc.RpcError) as info:
            self._stream(d.address, [open_request(p), step_request(0, 0, hidden_tensor(3))])
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # a new session starts again at 1
        replies = self._stream(d.address, [open_request(p), step_request(1, 0, hidden_tensor(2))])
        assert replies[1].result.cached_length == 2
        wait_until(lambda: sessions_open(d.address) == 0, what="sessions back to 0")
        assert d.proc.poll() is None


def test_an_idle_session_closed_by_the_daemon_is_reopened(
    tiny_models: Models, daemon_factory: Factory
) -> None:
    """The daemon closes a session idle past ``--idle-timeout`` (ABORTED, cache freed); the
    client's next step reopens it and rebuilds the cache, and the reply goes on unchanged."""
    model = tiny_models["llama"]
    d = daemon_factory(model, *SPLIT, "--idle-timeout", "1s")
    split = connect(d.address, model)
    ref = split.pipeline()
    want = run_ids(ref, PROMPT, 12).token_ids
    ref.close()
    events: list[object] = []
    pipe = split.pipeline(FAST_RETRY, events.append)
    try:
        head = run_ids(pipe, PROMPT, 6)
        wait_until(lambda: sessions_open(d.address) == 0, what="the idle session closed")
        tail = run_ids(pipe, [head.token_ids[-1]], 6, start_position=len(PROMPT) + 5)
        assert head.token_ids + tail.token_ids == want
        assert [type(e) for e in events] == [Reconnecting, Resumed]
        first = events[0]
        assert isinstance(first, Reconnecting) and "ABORTED" in first.error and "idle" in first.error
    finally:
        pipe.close()
        split.close()
