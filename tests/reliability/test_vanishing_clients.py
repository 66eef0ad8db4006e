"""Failure table, row 2: 1000 clients open a session, send a step and vanish (their process is
SIGKILLed). The daemon frees every session and its memory comes back: RSS within 5% of its
start, measured after a warm-up round (the first sessions grow allocator pools and gRPC's
buffers once)."""

from __future__ import annotations

import logging
import subprocess
import sys
import time

from .helpers import Factory, Models, rss, scaled, sessions_open, wait_until

log = logging.getLogger(__name__)

PER_PROCESS = 100
AT_ONCE = 2  # client processes alive together: 200 sessions open at the peak


def _vanishing_round(address: str, processes: int) -> None:
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.reliability.vanishing_clients",
                address,
                str(PER_PROCESS),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    try:
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline().strip()
            assert line == f"ready {PER_PROCESS}", f"client process said {line!r}"
        assert sessions_open(address) == PER_PROCESS * processes
    finally:
        for p in procs:
            p.kill()
            p.wait(30)
    wait_until(lambda: sessions_open(address) == 0, timeout=60, what="sessions back to 0")


def test_clients_that_vanish_leave_nothing_behind(
    tiny_models: Models, daemon_factory: Factory
) -> None:
    total = scaled(1000, 10_000)
    d = daemon_factory(
        tiny_models["llama"], "--split", "2:4", "--max-sessions", str(PER_PROCESS * AT_ONCE)
    )
    _vanishing_round(d.address, AT_ONCE)  # warm-up
    start = rss(d)
    t0 = time.monotonic()
    for _ in range(total // (PER_PROCESS * AT_ONCE)):
        _vanishing_round(d.address, AT_ONCE)
    took = time.monotonic() - t0
    end = rss(d)
    log.warning(
        "%d vanishing clients in %.1f s: sessions back to 0; daemon RSS %.1f -> %.1f MiB (%+.2f%%)",
        total,
        took,
        start / 2**20,
        end / 2**20,
        100 * (end - start) / start,
    )
    assert d.proc.poll() is None
    assert abs(end - start) <= 0.05 * start, f"RSS {start / 2**20:.1f} -> {end / 2**20:.1f} MiB"
    assert "Traceback" not in d.log_text()
