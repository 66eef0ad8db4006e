"""systemd's readiness protocol (sd_notify) over the ``NOTIFY_SOCKET`` datagram socket.

A few lines of standard library instead of a C binding: each notification is one datagram of
``KEY=VALUE`` lines sent to the socket systemd names in ``NOTIFY_SOCKET`` (a path, or an abstract
name written with a leading ``@``). Without ``NOTIFY_SOCKET`` (not under systemd, or not
``Type=notify``) every call is a no-op, so the daemon calls these unconditionally.

What the daemon sends: ``EXTEND_TIMEOUT_USEC`` while it loads weights (a big model may take
longer than ``TimeoutStartSec``), ``READY=1`` once the weights are loaded and the server listens,
``STATUS=`` lines (model, plan, sessions), ``WATCHDOG=1`` from the serving loop at half the
``WatchdogSec`` interval (a hung loop stops pinging and systemd restarts the unit), and
``STOPPING=1`` when shutdown begins.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator, Mapping

log = logging.getLogger(__name__)


def _socket_address(value: str) -> str | None:
    """The ``AF_UNIX`` address of a ``NOTIFY_SOCKET`` value; ``@name`` is an abstract socket."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # vsock (vsock:CID:PORT) and anything else: not for a process on the host


def watchdog_interval_s(env: Mapping[str, str], pid: int | None = None) -> float | None:
    """systemd's watchdog timeout in seconds, when it is meant for this process, else None.

    ``WATCHDOG_USEC`` is the timeout; ``WATCHDOG_PID``, when set, names the process it is for
    (a child that inherited the environment must not ping on its parent's behalf).
    """
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    target = env.get("WATCHDOG_PID", "")
    if target and (
        not target.isdigit() or int(target) != (pid if pid is not None else os.getpid())
    ):
        return None
    return int(usec) / 1e6


class Notifier:
    """Sends notifications to the service manager; a no-op without ``NOTIFY_SOCKET``.

    Thread-safe: the loading thread and the event loop both send.

    Args:
        env: the environment to read (``os.environ`` by default).
    """

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_s = watchdog_interval_s(env) if self.address else None
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        if env.get("NOTIFY_SOCKET") and self.address is None:
            log.warning(
                "NOTIFY_SOCKET=%s is not a unix socket address; not notifying", env["NOTIFY_SOCKET"]
            )

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """Send ``KEY=VALUE`` lines as one datagram. Returns False when nothing was sent.

        A failure to notify is logged, never raised: the daemon serves on regardless.
        """
        if self.address is None:
            return False
        payload = "\n".join(line.replace("\n", " ") for line in lines).encode()
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(
                        socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                    )
                self._sock.sendto(payload, self.address)
            except OSError as e:
                log.warning("sd_notify to %s failed: %s", self.address.lstrip("\0"), e)
                return False
        return True

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def ready(self, status: str) -> bool:
        """The weights are loaded and the server listens: systemd may start dependants."""
        return self.send("READY=1", f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self, status: str) -> bool:
        return self.send("STOPPING=1", f"STATUS={status}")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before systemd gives up on the start (or stop)."""
        return self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    @contextlib.contextmanager
    def extending(
        self, status: str, every_s: float = 10.0, extend_s: float = 30.0
    ) -> Iterator[None]:
        """While the body runs (loading weights), keep extending the start timeout.

        A thread sends ``EXTEND_TIMEOUT_USEC`` (and ``WATCHDOG=1``, since loading is progress,
        not a hang) every ``every_s`` seconds, each asking for ``extend_s`` more.
        """
        if not self.enabled:
            yield
            return
        done = threading.Event()
        if self.watchdog_s is not None:
            every_s = min(every_s, self.watchdog_s / 2)
        extend_s = max(extend_s, 3 * every_s)

        def keep_extending() -> None:
            while True:
                self.extend_timeout(extend_s)
                if self.watchdog_s is not None:
                    self.watchdog()
                if done.wait(every_s):
                    return

        self.status(status)
        t = threading.Thread(target=keep_extending, name="sd-notify-extend", daemon=True)
        t.start()
        try:
            yield
        finally:
            done.set()
            t.join()

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


async def heartbeat(
    notifier: Notifier, status: Callable[[], str], status_every_s: float = 5.0
) -> None:
    """Run on the event loop until cancelled: ``WATCHDOG=1`` at half the watchdog timeout, and
    ``STATUS=`` whenever ``status()`` changes (checked at the same pace, at least every
    ``status_every_s``).

    The pings come from the loop that serves requests, so a loop that stops turning stops
    pinging, and systemd restarts the unit.
    """
    if not notifier.enabled:
        return
    every = (
        status_every_s
        if notifier.watchdog_s is None
        else min(status_every_s, notifier.watchdog_s / 2)
    )
    last = ""
    while True:
        if notifier.watchdog_s is not None:
            notifier.watchdog()
        now = status()
        if now != last:
            notifier.status(now)
            last = now
        await asyncio.sleep(every)
