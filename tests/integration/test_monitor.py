"""The monitor stream of a real daemon process over a real socket: ``splitlm monitor``, shared
sampling across subscribers, trunk figures after steps, refusals, shutdown, and the no-GPU path
for real (this machine has no NVIDIA driver)."""

from __future__ import annotations

import json
import logging
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import fields
from datetime import datetime
from pathlib import Path

import pytest
import torch

from splitlm.shared.client import MonitorStream, TrunkClient
from splitlm.shared.errors import DaemonUnreachable, TrunkError
from splitlm.shared.monitor import MonitorSample
from splitlm.shared.plan import Fingerprint
from tests.conftest import Daemon, run_cli, start_daemon

log = logging.getLogger(__name__)

HIDDEN = 64  # tiny_config's hidden size
FIELDS = [f.name for f in fields(MonitorSample)]


@pytest.fixture(scope="module")
def daemon(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One tiny-Llama daemon for the module (each test uses its own monitor interval)."""
    tmp = tmp_path_factory.mktemp("monitor")
    d = start_daemon(tiny_models["llama"], f"unix:{tmp / 'trunk.sock'}", tmp / "trunkd.log", "--split", "2:4")
    yield d
    assert d.stop() == 0, d.log_text()[-3000:]
    assert "Traceback" not in d.log_text()


def wait_until(pred: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout} s"
        time.sleep(0.05)


class Collector:
    """Iterates one ``MonitorStream`` in a thread, keeping the samples and how it ended."""

    def __init__(self, stream: MonitorStream) -> None:
        self.stream = stream
        self.samples: list[MonitorSample] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for s in self.stream:
                self.samples.append(s)
        except BaseException as e:  # noqa: B036 - handed to the test
            self.error = e

    def stop(self) -> None:
        self.stream.cancel()
        self.thread.join(10)
        assert not self.thread.is_alive()


def monitor_cli(address: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "splitlm.tui.cli", "monitor", "--trunk", address, *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def read_lines(proc: subprocess.Popen[str], n: int, timeout: float = 60.0) -> list[str]:
    """``n`` lines of ``proc``'s stdout as they are flushed (a reader thread: no blocking test)."""
    lines: list[str] = []
    assert proc.stdout is not None
    out = proc.stdout

    def reader() -> None:
        for line in out:
            lines.append(line)
            if len(lines) >= n:
                return

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    t.join(timeout)
    assert len(lines) >= n, f"{len(lines)} lines in {timeout} s; stderr: {proc.stderr.read() if proc.poll() is not None else ''}"  # type: ignore[union-attr]
    return lines[:n]


def test_cli_monitor_json_then_ctrl_c(daemon: Daemon) -> None:
    proc = monitor_cli(daemon.address, "--json", "--interval", "0.25")
    try:
        samples = [json.loads(line) for line in read_lines(proc, 3)]
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and err == "", err
    for s in samples:
        assert list(s) == FIELDS
        assert 0 <= s["cpu_percent"] <= 100 and 0 < s["mem_used_bytes"] < s["mem_total_bytes"]
        assert s["daemon_rss_bytes"] > 10 * 2**20 and s["interval_s"] == 0.25
        # no NVIDIA driver on this machine: the real no-GPU path, an empty list and the reason
        assert s["gpus"] == [] and s["gpu_status"].startswith("no NVIDIA GPU: "), s["gpu_status"]
    times = [s["time"] for s in samples]
    assert times == sorted(times) and len(set(times)) == 3


def test_cli_monitor_text_line(daemon: Daemon) -> None:
    proc = monitor_cli(daemon.address, "--interval", "0.25")
    try:
        (line,) = read_lines(proc, 1)
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and err == ""
    assert re.match(r"\d\d:\d\d:\d\d  cpu +\d+\.\d%", line), line
    assert "no NVIDIA GPU" in line and "sessions 0" in line


def test_two_subscribers_share_one_sampler(daemon: Daemon) -> None:
    """Both get the very same samples (same ``time``), and the daemon started one sampler for
    the interval and stopped it once both had gone."""
    started = daemon.log_text().count("monitor: sampling every 0.5 s")
    stopped = daemon.log_text().count("stopped sampling every 0.5 s")
    client = TrunkClient(daemon.address)
    try:
        a = Collector(client.monitor(0.5))
        wait_until(lambda: len(a.samples) >= 1, what="a's first sample")
        b = Collector(client.monitor(0.5))
        wait_until(lambda: len(b.samples) >= 3, what="b's samples")
        a.stop()
        b.stop()
    finally:
        client.close()
    assert a.error is None and b.error is None, (a.error, b.error)
    times_a = [s.time for s in a.samples]
    times_b = [s.time for s in b.samples]
    assert set(times_b[:3]) <= set(times_a), (times_a, times_b)
    gaps = [y - x for x, y in zip(times_a, times_a[1:])]
    assert all(g > 0.3 for g in gaps), f"one sample per 0.5 s, not per subscriber: {gaps}"
    assert daemon.log_text().count("monitor: sampling every 0.5 s") == started + 1
    wait_until(
        lambda: daemon.log_text().count("stopped sampling every 0.5 s") == stopped + 1,
        what="the sampler stopping once its subscribers left",
    )


def test_steps_show_in_samples(daemon: Daemon) -> None:
    client = TrunkClient(daemon.address)
    p = client.info().plan
    session = client.open_session(
        Fingerprint(p.config_digest, p.weights_digest, p.trunk_start, p.trunk_end), torch.float32
    )
    stop = threading.Event()

    def step_forever() -> None:
        h = torch.randn(1, 4, HIDDEN)
        position = 0
        while not stop.is_set():
            session.step(h, position)
            position = (position + 4) % 128  # rolls back now and then: stays under max_context

    mon = Collector(client.monitor(0.25))
    stepper = threading.Thread(target=step_forever, daemon=True)
    stepper.start()
    try:
        wait_until(lambda: any(s.steps > 0 for s in mon.samples[1:]), what="a sample with steps")
        wait_until(lambda: len(mon.samples) >= 4, what="more samples")
    finally:
        stop.set()
        stepper.join(30)
        session.close()
        mon.stop()
        client.close()
    assert mon.error is None, mon.error
    busy = [s for s in mon.samples if s.steps > 0]
    assert busy
    windows = []
    for s in busy:
        assert s.tokens_per_s > 0 and s.step_p50_ms > 0 and s.step_p95_ms >= s.step_p50_ms
        windows.append(4 * s.steps / s.tokens_per_s)  # 4 positions per step
    # the rate is positions over the sample's own window: about the interval (longer after a
    # late tick, never under half of it)
    assert all(0.12 <= w <= 1.5 for w in windows), windows
    assert any(0.2 <= w <= 0.3 for w in windows), windows
    assert any(s.sessions_open == 1 and s.trunk_cache_bytes > 0 for s in busy)
    assert all(s.trunk_cache_used_bytes <= s.trunk_cache_bytes for s in mon.samples)


@pytest.mark.parametrize("interval", [0.1, 20.0, -1.0])
def test_interval_out_of_range_is_invalid_argument(daemon: Daemon, interval: float) -> None:
    client = TrunkClient(daemon.address)
    try:
        with pytest.raises(TrunkError) as e:
            next(iter(client.monitor(interval)))
        assert e.value.code == "INVALID_ARGUMENT"
        assert "0.25-10 s" in e.value.details
        assert client.info().plan.trunk_end == 4  # still serving
    finally:
        client.close()


def test_unset_interval_means_one_second(daemon: Daemon) -> None:
    client = TrunkClient(daemon.address)
    try:
        stream = client.monitor(0)
        first = next(iter(stream))
        stream.cancel()
    finally:
        client.close()
    assert first.interval_s == 1.0


def test_no_daemon_same_error_as_info(tmp_path: Path) -> None:
    address = f"unix:{tmp_path / 'nobody.sock'}"
    mon = run_cli("monitor", "--trunk", address, "--json", timeout=60)
    info = run_cli("info", "--trunk", address, timeout=60)
    assert mon.returncode == info.returncode == 1
    assert mon.stdout == ""
    assert mon.stderr.splitlines()[0] == info.stderr.splitlines()[0]
    assert "no trunk daemon answers at" in mon.stderr and "Traceback" not in mon.stderr


def _log_time(log: str, marker: str) -> datetime:
    line = next(x for x in log.splitlines() if marker in x)
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")


def test_shutdown_ends_monitor_streams_at_once(tiny_models: dict[str, Path], daemon_factory) -> None:  # type: ignore[no-untyped-def]
    """A monitor stream never ends by itself: at SIGTERM the daemon ends it with UNAVAILABLE
    instead of waiting out its 10 s grace for it."""
    d = daemon_factory(tiny_models["llama"], "--split", "2:4")
    client = TrunkClient(d.address)
    try:
        mon = Collector(client.monitor(0.25))
        wait_until(lambda: len(mon.samples) >= 1, what="a sample")
        assert d.stop() == 0
        mon.thread.join(10)
    finally:
        client.close()
    assert isinstance(mon.error, DaemonUnreachable) and "shutting down" in str(mon.error), mon.error
    log = d.log_text()
    took = (_log_time(log, "server: stopped") - _log_time(log, "server: stopping")).total_seconds()
    assert took < 5, f"stop took {took:.1f} s: the monitor stream held the grace period"
    assert "Traceback" not in log


def test_idle_daemon_cpu_with_a_subscriber(daemon: Daemon) -> None:
    """What listening costs the daemon: CPU seconds per wall second at 0.25 s (logged, loose)."""
    import psutil

    proc = psutil.Process(daemon.proc.pid)
    client = TrunkClient(daemon.address)
    try:
        mon = Collector(client.monitor(0.25))
        wait_until(lambda: len(mon.samples) >= 1, what="a sample")
        c0, t0, n0 = sum(proc.cpu_times()[:2]), time.monotonic(), len(mon.samples)
        wait_until(lambda: len(mon.samples) >= n0 + 8, what="8 more samples")
        c1, t1 = sum(proc.cpu_times()[:2]), time.monotonic()
        mon.stop()
    finally:
        client.close()
    share = (c1 - c0) / (t1 - t0)
    log.info("daemon CPU while streaming at 0.25 s: %.1f%% of one core", share * 100)
    assert share < 0.25, f"sampling costs {share * 100:.0f}% of a core"
