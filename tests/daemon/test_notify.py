"""sd_notify against a notify socket the test owns, and the real daemon under it.

The daemon must say READY=1 only once the weights are loaded and the socket answers, ping the
watchdog from its serving loop at half WATCHDOG_USEC, keep STATUS= current (sessions), and say
STOPPING=1 on SIGTERM before it exits 0.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from splitlm.daemon.notify import Notifier, watchdog_interval_s
from splitlm.shared.client import TrunkClient
from splitlm.shared.plan import Fingerprint
from tests.conftest import spawn_trunkd


@dataclass
class NotifySocket:
    """A datagram socket playing systemd: records every notification with its arrival time."""

    sock: socket.socket
    name: str
    messages: list[tuple[float, dict[str, str]]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _receive(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._lock:
                self.messages.append((time.monotonic(), fields))

    def with_key(self, key: str) -> list[tuple[float, dict[str, str]]]:
        with self._lock:
            return [(t, m) for t, m in self.messages if key in m]

    def wait_for(
        self,
        pred: Callable[[], object],
        timeout: float,
        what: str,
        proc: subprocess.Popen | None = None,
    ) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"daemon exited with {proc.returncode} before {what}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout} s; got {self.messages}")
            time.sleep(0.02)


def _notify_socket(name: str) -> Iterator[NotifySocket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name[1:] if name.startswith("@") else name)
    ns = NotifySocket(sock, name)
    t = threading.Thread(target=ns._receive, daemon=True)
    t.start()
    yield ns
    sock.close()


@pytest.fixture
def notify_path(tmp_path: Path) -> Iterator[NotifySocket]:
    yield from _notify_socket(str(tmp_path / "notify.sock"))


@pytest.fixture
def notify_abstract() -> Iterator[NotifySocket]:
    yield from _notify_socket(f"@splitlm-test-{uuid.uuid4().hex}")


@pytest.mark.parametrize("which", ["notify_path", "notify_abstract"])
def test_notifier_sends_datagrams(which: str, request: pytest.FixtureRequest) -> None:
    ns: NotifySocket = request.getfixturevalue(which)
    n = Notifier({"NOTIFY_SOCKET": ns.name})
    assert n.enabled
    assert n.ready("serving x")
    assert n.extend_timeout(2.5)
    ns.wait_for(lambda: len(ns.messages) == 2, 5, "two datagrams")
    assert ns.messages[0][1] == {"READY": "1", "STATUS": "serving x"}
    assert ns.messages[1][1] == {"EXTEND_TIMEOUT_USEC": "2500000"}
    n.close()


def test_without_notify_socket_nothing_is_sent() -> None:
    n = Notifier({})
    assert not n.enabled and not n.ready("x") and not n.watchdog()
    assert Notifier({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled is False


def test_watchdog_interval_only_for_this_process() -> None:
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert (
        watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 30.0
    )
    assert (
        watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)})
        is None
    )
    assert watchdog_interval_s({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval_s({}) is None


def test_extending_keeps_extending_while_loading(notify_path: NotifySocket) -> None:
    n = Notifier({"NOTIFY_SOCKET": notify_path.name})
    with n.extending("loading", every_s=0.05, extend_s=1.0):
        notify_path.wait_for(
            lambda: len(notify_path.with_key("EXTEND_TIMEOUT_USEC")) >= 3, 5, "3 extensions"
        )
    count = len(notify_path.with_key("EXTEND_TIMEOUT_USEC"))
    time.sleep(0.2)  # the extending thread has ended: no more extensions arrive
    assert len(notify_path.with_key("EXTEND_TIMEOUT_USEC")) == count
    assert notify_path.with_key("STATUS")[0][1]["STATUS"] == "loading"


def _open_session(address: str) -> tuple[TrunkClient, object]:
    client = TrunkClient(address)
    p = client.info().plan
    fp = Fingerprint(p.config_digest, p.weights_digest, p.trunk_start, p.trunk_end)
    return client, client.open_session(fp, torch.float32)


def test_daemon_under_a_notify_socket(
    tiny_models: dict[str, Path], tmp_path: Path, notify_path: NotifySocket
) -> None:
    """READY=1 after loading (the socket answers by then), watchdog pings at half WATCHDOG_USEC
    (1 s: a loaded 2-core machine leaves the loop 0.5 s of slack), STATUS= follows the session
    count, STOPPING=1 on SIGTERM, exit 0, socket removed."""
    sock = tmp_path / "trunk.sock"
    env = dict(os.environ, NOTIFY_SOCKET=notify_path.name, WATCHDOG_USEC="1000000")
    env.pop("WATCHDOG_PID", None)
    log = (tmp_path / "trunkd.log").open("wb")
    proc = spawn_trunkd(
        "--model", str(tiny_models["llama"]), "--split", "2:4", "--listen", f"unix:{sock}",
        "--threads", "1", log=log, env=env,
    )
    try:
        notify_path.wait_for(lambda: notify_path.with_key("READY"), 120, "READY=1", proc)
        # READY=1 means serving: Info answers at once, without waiting for the socket to appear
        client = TrunkClient(f"unix:{sock}", connect_timeout_s=2.0)
        assert client.info().plan.trunk_end == 4
        client.close()
        ready_at, ready = notify_path.with_key("READY")[0]
        assert ready["STATUS"].startswith("serving ") and "0 sessions" in ready["STATUS"]
        before = [m for t, m in notify_path.messages if t < ready_at]
        assert any("EXTEND_TIMEOUT_USEC" in m for m in before), (
            "no EXTEND_TIMEOUT_USEC while loading"
        )
        assert any(m.get("STATUS", "").startswith("loading ") for m in before)

        notify_path.wait_for(
            lambda: len([t for t, _ in notify_path.with_key("WATCHDOG") if t > ready_at]) >= 5,
            10,
            "5 watchdog pings",
        )
        pings = [t for t, _ in notify_path.with_key("WATCHDOG") if t > ready_at]
        gaps = [b - a for a, b in zip(pings, pings[1:])]
        assert max(gaps) < 1.0, (
            f"watchdog pings {gaps} s apart: systemd would kill the unit at 1 s"
        )

        client, session = _open_session(f"unix:{sock}")
        notify_path.wait_for(
            lambda: any("1 sessions" in m["STATUS"] for _, m in notify_path.with_key("STATUS")),
            10,
            "STATUS with 1 session",
        )
        session.close()
        client.close()

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        stopping = notify_path.with_key("STOPPING")
        assert len(stopping) == 1 and stopping[0][1]["STATUS"].startswith("stopping")
        assert not sock.exists()
        assert not [t for t, _ in notify_path.with_key("WATCHDOG") if t > stopping[0][0]]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
