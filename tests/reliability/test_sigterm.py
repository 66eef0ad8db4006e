"""Failure table, row 6: SIGTERM while 8 sessions are generating. Each client either completes or
gets a clean status (UNAVAILABLE, CANCELLED, ABORTED: never INTERNAL, UNKNOWN or a hang), and the
daemon exits 0 and removes its socket. With failover on and the daemon started again (what
systemd's restart does), all 8 replies complete and equal their solo runs."""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path

from splitlm.shared.errors import DaemonUnreachable, SplitlmError, TrunkError
from splitlm.shared.failover import NO_FAILOVER, Resumed, RetryPolicy
from splitlm.shared.generation import GenerationResult
from tests.conftest import Daemon, start_daemon

from .helpers import (
    FAST_RETRY,
    Factory,
    Models,
    Split,
    TokenEvent,
    connect,
    prompt_of,
    run_ids,
    scaled,
    wait_until,
)

log = logging.getLogger(__name__)

SPLIT = ("--split", "2:4")
CLEAN = {"UNAVAILABLE", "CANCELLED", "ABORTED"}
SESSIONS = 8


def _solo(split: Split, n: int) -> list[list[int]]:
    out = []
    for i in range(SESSIONS):
        pipe = split.pipeline()
        out.append(run_ids(pipe, prompt_of(i), n).token_ids)
        pipe.close()
    return out


def _generate_all(
    splits: list[Split], n: int, retry: RetryPolicy, events: list[object] | None = None
) -> tuple[list[object], list[list[int]], list[threading.Thread]]:
    """Start 8 sessions in threads; each token waits 10 ms so they are mid-reply for seconds."""
    results: list[object] = [None] * SESSIONS
    streamed: list[list[int]] = [[] for _ in range(SESSIONS)]

    def worker(i: int) -> None:
        def on_token(ev: TokenEvent) -> None:
            streamed[i].append(ev.token_id)
            time.sleep(0.01)

        pipe = splits[i].pipeline(retry, None if events is None else events.append)
        try:
            results[i] = run_ids(pipe, prompt_of(i), n, on_token=on_token)
        except SplitlmError as e:
            results[i] = e
        except Exception as e:  # noqa: BLE001 - anything else is a finding
            results[i] = RuntimeError(f"unclean: {type(e).__name__}: {e}")
        finally:
            pipe.close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(SESSIONS)]
    for t in threads:
        t.start()
    wait_until(lambda: all(len(s) >= 5 for s in streamed), what="8 sessions mid-reply")
    return results, streamed, threads


def _sigterm(d: Daemon) -> int:
    d.proc.send_signal(signal.SIGTERM)
    return d.proc.wait(60)


def test_sigterm_during_8_sessions(tiny_models: Models, daemon_factory: Factory) -> None:
    model, n = tiny_models["llama"], scaled(150, 230)
    d = daemon_factory(model, *SPLIT)
    splits = [connect(d.address, model) for _ in range(SESSIONS)]
    want = _solo(splits[0], n)
    results, streamed, threads = _generate_all(splits, n, NO_FAILOVER)
    assert _sigterm(d) == 0, d.log_text()[-3000:]
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a client hangs after the daemon stopped"
    outcomes = []
    for i, r in enumerate(results):
        if isinstance(r, GenerationResult):
            assert r.token_ids == want[i]
            outcomes.append("completed")
        else:
            code = (
                "UNAVAILABLE" if isinstance(r, DaemonUnreachable) else getattr(r, "code", repr(r))
            )
            assert isinstance(r, (TrunkError, DaemonUnreachable)) and code in CLEAN, (
                f"session {i}: {r!r}"
            )
            assert streamed[i] == want[i][: len(streamed[i])]  # what it did get was right
            outcomes.append(code)
    log.info("SIGTERM during %d sessions: %s; exit 0", SESSIONS, outcomes)
    assert not Path(d.address.removeprefix("unix:")).exists(), "the socket was left behind"
    assert "Traceback" not in d.log_text()
    for s in splits:
        s.close()


def test_sigterm_then_restart_with_failover(
    tiny_models: Models, daemon_factory: Factory, tmp_path: Path
) -> None:
    model, n = tiny_models["llama"], scaled(150, 230)
    d = daemon_factory(model, *SPLIT)
    splits = [connect(d.address, model) for _ in range(SESSIONS)]
    want = _solo(splits[0], n)
    events: list[object] = []
    results, _, threads = _generate_all(splits, n, FAST_RETRY, events)
    assert _sigterm(d) == 0, d.log_text()[-3000:]
    again = start_daemon(model, d.address, tmp_path / "again.log", *SPLIT)
    try:
        for t in threads:
            t.join(120)
        for i, r in enumerate(results):
            assert isinstance(r, GenerationResult), f"session {i}: {r!r}"
            assert r.token_ids == want[i], f"session {i} differs after the restart"
        resumed = [e for e in events if isinstance(e, Resumed)]
        log.info(
            "SIGTERM + restart: %d sessions resumed, replay %s ms",
            len(resumed),
            [round(e.replay_s * 1e3) for e in resumed],
        )
        assert resumed, "no session was interrupted"
    finally:
        for s in splits:
            s.close()
        assert again.stop() == 0
