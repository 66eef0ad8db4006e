"""Following the daemon's monitor stream from a worker thread, reconnecting with backoff.

The feed is also the app's view of the daemon's health: samples arriving mean connected; a lost
stream means reconnecting, and still lost after ``down_after_s`` means down. No UI here: the app's
worker runs ``run`` and turns the callbacks into messages.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ...shared.errors import SplitlmError, TrunkError

if TYPE_CHECKING:
    from ...shared.client import TrunkClient

log = logging.getLogger(__name__)

CONNECTED, CONNECTING, RECONNECTING, DOWN = "connected", "connecting", "reconnecting", "down"


class MonitorFeed:
    """One subscription at a time to ``TrunkClient.monitor``.

    Args:
        client: its own client (the feed's channel is not the chat's).
        interval_s: sampling interval asked of the daemon.
        on_sample: each ``MonitorSample``.
        on_state: ``(state, detail)`` when the connection state changes.
        on_unavailable: the daemon has no monitor stream (an older daemon); the feed stops.
        down_after_s: how long a lost stream counts as reconnecting before it counts as down.
        max_delay_s: the longest wait between two attempts.
    """

    def __init__(
        self,
        client: TrunkClient,
        interval_s: float,
        on_sample: Callable[[Any], None],
        on_state: Callable[[str, str], None],
        on_unavailable: Callable[[str], None],
        down_after_s: float = 3.0,
        max_delay_s: float = 5.0,
    ) -> None:
        self.client = client
        self.interval_s = interval_s
        self.on_sample = on_sample
        self.on_state = on_state
        self.on_unavailable = on_unavailable
        self.down_after_s = down_after_s
        self.max_delay_s = max_delay_s
        self.state = CONNECTING
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._stream: Any = None
        self._lock = threading.Lock()

    def _set(self, state: str, detail: str = "") -> None:
        if state != self.state:
            self.state = state
            self.on_state(state, detail)

    def run(self) -> None:
        """Follow the stream until ``stop`` (blocking; call on a worker thread)."""
        delay = 0.25
        lost_at: float | None = None
        while not self._stop.is_set():
            try:
                stream = self.client.monitor(self.interval_s)
                with self._lock:
                    self._stream = stream
                if self._stop.is_set():
                    stream.cancel()
                    break
                for sample in stream:
                    lost_at, delay = None, 0.25
                    self._set(CONNECTED)
                    self.on_sample(sample)
                if self._stop.is_set():
                    break
                error = "the daemon ended the monitor stream"
            except TrunkError as e:
                if e.code == "UNIMPLEMENTED":
                    self.on_unavailable(f"this daemon has no monitor stream ({e.details})")
                    return
                error = str(e).splitlines()[0]
            except SplitlmError as e:
                error = str(e).splitlines()[0]
            now = time.monotonic()
            lost_at = lost_at if lost_at is not None else now
            if self.state == CONNECTED or (self.state != DOWN and now - lost_at < self.down_after_s):
                self._set(RECONNECTING, error)
            else:
                self._set(DOWN, error)
            log.info("monitor stream: %s; next try in %.2f s", error, delay)
            self._wake.wait(delay)
            self._wake.clear()
            delay = min(self.max_delay_s, delay * 2)

    def retry_now(self) -> None:
        """Skip the current wait (the retry key)."""
        self._wake.set()

    def stop(self) -> None:
        """End ``run`` (any thread): cancels the stream in progress."""
        self._stop.set()
        self._wake.set()
        with self._lock:
            stream = self._stream
        if stream is not None:
            stream.cancel()
