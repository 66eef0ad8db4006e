"""No wait is unbounded (issue 11, item 3): a daemon that accepts a step and stalls while still
answering keepalive pings and ``Info`` must not hang the client. The step's deadline ends in a
failover (reconnect + replay, tokens still the full model's) or, failover off or exhausted, in
an error that names the deadline and the setting that raises it.

The stall is real: a ``grpc.aio`` Trunk server (``stalling_proxy``) in front of a real daemon
subprocess forwards a session's first steps and then stops answering.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch

from splitlm.protos import trunk_pb2_grpc as pb_grpc
from splitlm.shared import prepare
from splitlm.shared.client import TrunkClient
from splitlm.shared.deadline import StepClock, StepDeadline, StepDeadlineExceeded, Watchdog
from splitlm.shared.errors import UsageError
from splitlm.shared.failover import (
    NO_FAILOVER,
    FailoverGaveUp,
    FailoverSession,
    Reconnecting,
    Resumed,
    RetryPolicy,
)
from splitlm.shared.generation import LocalPipeline
from tests.shared.test_engine import _NoText

from .helpers import PROMPT, Factory, Models, run_ids, sessions_open, wait_until
from .stalling_proxy import StallingProxy

log = logging.getLogger(__name__)
SPLIT = ("--split", "2:4")
T = TypeVar("T")

TEST_DEADLINE = StepDeadline(floor_s=2.0, per_position_s=0.0, latency_factor=1.0)
"""2 s a step, and (tiny model: milliseconds per position) hardly more: the bound is ~2.0 s."""


def _client(address: str, model_dir: Path, deadline: StepDeadline) -> tuple[TrunkClient, prepare.SplitParts]:
    from splitlm.shared.models import family_for, resolve

    client = TrunkClient(address, connect_timeout_s=10, step_deadline=deadline)
    src = resolve(str(model_dir))
    model = prepare.LoadedModel(src, family_for(src.config), _NoText(), src.generation_eos())
    parts = prepare.split_parts(model, client.info(), torch.device("cpu"), with_full=True)
    return client, parts


def _bounded(fn: Callable[[], T], limit_s: float) -> T:
    """``fn()`` on a thread; fails the test instead of hanging it when ``fn`` does not return
    within ``limit_s`` (what the code before the step deadline did: it waited forever)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised on the test thread
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(limit_s)
    assert not t.is_alive(), f"still waiting after {limit_s:.0f} s on a daemon that stopped answering"
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


@pytest.fixture
def stalled(tiny_models: Models, daemon_factory: Factory, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """A real daemon behind a stalling proxy: ``make(answer_steps, stall_sessions)``."""
    proxies: list[StallingProxy] = []
    model = tiny_models["llama"]
    daemon = daemon_factory(model, *SPLIT)

    def make(answer_steps: int, stall_sessions: int | None = 1) -> tuple[Any, StallingProxy, Path]:
        proxy = StallingProxy(
            daemon.address, f"unix:{tmp_path / f'proxy{len(proxies)}.sock'}", answer_steps, stall_sessions
        ).start()
        proxies.append(proxy)
        return daemon, proxy, model

    yield make
    for p in proxies:
        p.stop()


def test_a_stalled_step_fails_over_and_stays_exact(stalled: Callable[..., Any]) -> None:
    """The proxy answers the prompt and 5 tokens, then takes step 7 and never answers, while it
    still answers Info on the same socket. The step's deadline (2 s here) cancels the stream;
    the session reopens, replays, and the 24 tokens equal the full model's."""
    daemon, proxy, model = stalled(answer_steps=6)
    client, parts = _client(proxy.address, model, TEST_DEADLINE)
    assert parts.full is not None
    want = run_ids(LocalPipeline(parts.full), PROMPT, 24).token_ids
    events: list[tuple[float, object]] = []
    pipe = prepare.split_pipeline(
        parts, client, retry=RetryPolicy(initial_delay_s=0.05, max_delay_s=0.5, deadline_s=60),
        on_reconnect=lambda e: events.append((time.monotonic(), e)),
    )
    try:
        box: dict[str, list[int]] = {}
        gen = threading.Thread(target=lambda: box.update(ids=run_ids(pipe, PROMPT, 24).token_ids), daemon=True)
        gen.start()
        assert proxy.stats.stalled_event.wait(60), "the proxy never stalled"
        stalled_at = time.monotonic()
        # the stalled server is alive: it answers Info (and keepalive pings) meanwhile
        probe = TrunkClient(proxy.address, connect_timeout_s=5)
        try:
            assert probe.info().plan.trunk_start == 2
        finally:
            probe.close()
        gen.join(60)
        assert not gen.is_alive(), "generation still waiting on the stalled step after 60 s"
        assert box["ids"] == want, "tokens differ from the full model's after the failover"
        session = pipe.session
        assert isinstance(session, FailoverSession) and len(session.resumes) == 1
        kinds = [e for _, e in events]
        first = next(e for e in kinds if isinstance(e, Reconnecting))
        assert "no reply within 2.0 s to step 7 (1 position)" in first.error
        noticed = next(t for t, e in events if isinstance(e, Reconnecting)) - stalled_at
        assert 1.5 < noticed < 2.0 + 3.0, f"the stall was noticed after {noticed:.1f} s"
        resumed = [e for e in kinds if isinstance(e, Resumed)][0]
        assert resumed.replayed_steps == 7  # the prompt, 5 tokens and the stalled step
        assert proxy.stats.stalled == [0] and proxy.stats.sessions == 2
        # the client cancelled the stalled stream: the daemon freed it, holds only the new one
        wait_until(lambda: sessions_open(daemon.address) == 1, 30, "the stalled session freed")
        log.info(
            "stalled after step 6: noticed after %.2f s (deadline 2 s), resumed in %.2f s "
            "(replay of %d steps %.0f ms); 24 tokens equal the full model's",
            noticed, resumed.downtime_s, resumed.replayed_steps, resumed.replay_s * 1e3,
        )
    finally:
        pipe.close()
        client.close()


def test_without_failover_a_stalled_step_names_the_deadline(stalled: Callable[..., Any]) -> None:
    """Failover off: the stalled step fails at its deadline with ``StepDeadlineExceeded``, which
    says which step, how long, and which setting raises it."""
    daemon, proxy, model = stalled(answer_steps=3)
    client, parts = _client(proxy.address, model, TEST_DEADLINE)
    pipe = prepare.split_pipeline(parts, client, retry=NO_FAILOVER)
    try:
        t0 = time.monotonic()
        with pytest.raises(StepDeadlineExceeded) as err:
            _bounded(lambda: run_ids(pipe, PROMPT, 12), 60)
        took = time.monotonic() - t0
        text = str(err.value)
        assert "no reply within 2.0 s to step 4 (1 position)" in text
        assert "--step-deadline" in text and "SPLITLM_STEP_DEADLINE" in text
        assert took < 2.0 + 5.0, f"the error came after {took:.1f} s"
        wait_until(lambda: sessions_open(daemon.address) == 0, 30, "the stalled session freed")
        log.info("failover off: the stalled step failed after %.2f s: %s", took, text.splitlines()[0])
    finally:
        pipe.close()
        client.close()


def test_a_daemon_that_keeps_stalling_runs_out_the_retry_deadline(stalled: Callable[..., Any]) -> None:
    """Every session stalls after 4 steps, the replays too: the client retries until its retry
    deadline (5 s) and then fails with an error naming both deadlines, in bounded time."""
    _, proxy, model = stalled(answer_steps=4, stall_sessions=None)
    deadline = StepDeadline(floor_s=1.5, per_position_s=0.0, latency_factor=1.0)
    client, parts = _client(proxy.address, model, deadline)
    policy = RetryPolicy(initial_delay_s=0.05, max_delay_s=0.3, deadline_s=5.0)
    pipe = prepare.split_pipeline(parts, client, retry=policy)
    try:
        t0 = time.monotonic()
        with pytest.raises(FailoverGaveUp) as err:
            _bounded(lambda: run_ids(pipe, PROMPT, 12), 90)
        took = time.monotonic() - t0
        text = str(err.value)
        assert "--retry-deadline" in text and "--step-deadline 1.5 s" in text
        assert proxy.stats.sessions >= 2 and len(proxy.stats.stalled) >= 2  # replays stalled too
        assert took < deadline.floor_s + policy.deadline_s + 5.0, f"gave up after {took:.1f} s"
        log.info("a daemon that keeps stalling: gave up after %.1f s, %d sessions tried",
                 took, proxy.stats.sessions)
    finally:
        pipe.close()
        client.close()


class TestBudget:
    """The default deadline's shape, without sockets."""

    def test_a_prefill_gets_an_allowance_per_position(self) -> None:
        d = StepDeadline()
        assert d.budget(1) == pytest.approx(60.05)
        assert d.budget(4096) == pytest.approx(60 + 4096 * 0.05)

    def test_observed_latency_scales_the_budget(self) -> None:
        clock = StepClock(StepDeadline(floor_s=10.0))
        clock.observe(1, 0.002)  # a fast daemon: the per-position allowance stays
        assert clock.budget(1) == pytest.approx(10.05)
        clock.observe(100, 50.0)  # 0.5 s per position: a slow device
        assert clock.budget(1) == pytest.approx(15.0)
        assert clock.budget(10) == pytest.approx(60.0)

    def test_only_recent_steps_count(self) -> None:
        clock = StepClock(StepDeadline(floor_s=10.0))
        clock.observe(1, 5.0)
        for _ in range(64):
            clock.observe(1, 0.001)
        assert clock.budget(1) == pytest.approx(10.05)

    @pytest.mark.parametrize("kwargs", [{"floor_s": 0}, {"per_position_s": -1}, {"latency_factor": 0.5}])
    def test_bad_values_are_refused(self, kwargs: dict[str, float]) -> None:
        with pytest.raises(UsageError):
            StepDeadline(**kwargs)

    def test_the_setting_reaches_the_client(self) -> None:
        from splitlm.shared import config

        loaded = config.load(config.ClientSettings, {}, env={"SPLITLM_STEP_DEADLINE": "90s"}, config=None,
                             file_name="client")
        assert loaded.settings.step_deadline == 90.0
        client = TrunkClient.from_settings(loaded.settings)
        try:
            assert client.step_deadline.floor_s == 90.0
        finally:
            client.close()
        assert config.ClientSettings().step_deadline == StepDeadline().floor_s


def test_the_watchdog_fires_only_what_stays_armed() -> None:
    dog = Watchdog()
    fired: list[str] = []
    try:
        kept = dog.arm(0.05, lambda: fired.append("kept"))
        gone = dog.arm(0.05, lambda: fired.append("gone"))
        assert dog.disarm(gone)
        wait_until(lambda: fired == ["kept"], 10, "the armed callback")
        assert not dog.disarm(kept)  # it already ran
    finally:
        dog.close()


def test_a_stalled_monitor_stream_ends_instead_of_waiting_forever(stalled: Callable[..., Any]) -> None:
    """The monitor stream was the other unbounded wait: 2 samples, then the proxy stops sending
    them (and still answers Info): the iteration ends with ``DaemonUnreachable`` once a sample
    is ``late_s`` past its interval, so the chat app's feed reconnects instead of freezing."""
    from splitlm.shared.errors import DaemonUnreachable

    _, proxy, _ = stalled(answer_steps=2, stall_sessions=None)
    client = TrunkClient(proxy.address, connect_timeout_s=10)
    try:
        got: list[object] = []
        stream = client.monitor(0.25, late_s=1.0)
        t0 = time.monotonic()
        with pytest.raises(DaemonUnreachable, match=r"no monitor sample within 1\.2 s"):
            _bounded(lambda: got.extend(stream), 60)
        took = time.monotonic() - t0
        assert len(got) == 2 and proxy.stats.stalled_event.is_set()
        assert took < 2 * 0.25 + 2 * 1.25 + 3.0, f"the stall ended the stream after {took:.1f} s"
        assert client.info().plan.trunk_start == 2  # the server itself still answers
        log.info("monitor stream stalled after 2 samples: ended %.2f s after subscribing (bound 1.25 s a sample)", took)
    finally:
        client.close()


class _SilentTrunk(pb_grpc.TrunkServicer):
    """Takes Session streams and never answers, not even the open (a daemon wedged before it
    could reply); its connection is healthy and answers pings."""

    def Session(self, request_iterator, context):  # type: ignore[no-untyped-def]  # noqa: N802
        for _ in request_iterator:  # until the client cancels the stream
            pass
        return
        yield


def test_the_first_open_is_bounded_too(tmp_path: Path) -> None:
    """Opening a session waited without a bound (only a resume's open had one): now it waits at
    most the step deadline's floor and names what it waited for."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from splitlm.shared.plan import Fingerprint

    address = f"unix:{tmp_path / 'silent.sock'}"
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_TrunkServicer_to_server(_SilentTrunk(), server)
    assert server.add_insecure_port(address)
    server.start()
    client = TrunkClient(address, step_deadline=StepDeadline(floor_s=1.0))
    try:
        t0 = time.monotonic()
        with pytest.raises(StepDeadlineExceeded, match=r"no reply within 1\.0 s to the open"):
            _bounded(lambda: client.open_session(Fingerprint("c", "w", 2, 4), torch.float32), 30)
        assert time.monotonic() - t0 < 1.0 + 3.0
    finally:
        client.close()
        server.stop(0)
