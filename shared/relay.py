"""A slow link in a box: a relay that forwards connections to the daemon with a set delay each
way, and optionally a bandwidth cap, keeping byte order.

Why: splitlm is meant for a client that is *not* next to the GPU, but this kernel has no
``netem``; the relay lets the bench (``splitlm bench --link-rtt 50ms``) and the tests put a
remote daemon's round trip between a client and a local one.

The link model, per direction: a chunk read at time ``t`` starts to cross when the link is free
(at once without a bandwidth cap), takes ``len / bandwidth`` seconds to cross, and is written out
``delay`` seconds after it has crossed. The delay is applied to each chunk by its own arrival
time, so chunks in flight overlap (a pipelined stream keeps its throughput, each chunk arrives
``delay`` later) and the order is kept (due times never decrease). ``rtt`` is the round trip:
each direction is delayed by half of it.

The relay runs its own asyncio loop on a thread of its own; ``start``/``stop`` (or ``with``) may
be called from any one thread. When either side of a connection ends (EOF or error), what is in
flight toward the other side is still delivered at its time, then both sides are closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from .errors import UsageError
from .paths import unix_path

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 1024
"""Largest read; with a bandwidth cap a chunk crosses in pieces of at most ``PIECE_BYTES``."""
PIECE_BYTES = 16 * 1024
"""With a bandwidth cap, the unit that crosses the link: small enough that a big message streams
rather than arriving in one lump after its whole crossing time."""
QUEUE_CHUNKS = 4096
"""Chunks in flight per direction before the relay stops reading (the sender then sees the
back-pressure of a full link, as over a real one)."""
START_TIMEOUT_S = 10.0


@dataclass
class LinkStats:
    """What crossed the relay (read from any thread; ints are updated on the relay's loop).

    Attributes:
        connections: connections accepted so far.
        open_connections: connections not yet closed.
        bytes_up: client → target bytes delivered.
        bytes_down: target → client bytes delivered.
    """

    connections: int = 0
    open_connections: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UsageError(f"relay address {address!r}: expected unix:/path or host:port")
    return host.strip("[]"), int(port)


@dataclass
class _Direction:
    """One direction of one connection: its delay, its cap and when its link is next free."""

    delay_s: float
    bandwidth: float | None
    up: bool
    free_at: float = 0.0
    queue: asyncio.Queue[tuple[float, bytes] | None] = field(
        default_factory=lambda: asyncio.Queue(QUEUE_CHUNKS)
    )

    def due(self, now: float, n: int) -> float:
        """When ``n`` bytes read at ``now`` come out of the other end (and book the link)."""
        if self.bandwidth is None:
            return now + self.delay_s
        start = max(now, self.free_at)
        self.free_at = start + n / self.bandwidth
        return self.free_at + self.delay_s


class Relay:
    """Forwards every connection made to ``address`` on to ``target``, delayed.

    Args:
        target: the daemon's address, ``unix:/path`` or ``host:port``.
        rtt_s: the round trip to add, seconds (each direction gets half).
        bandwidth: bytes per second per direction, or None for no cap.
        listen: where to listen: None for the same kind as ``target`` (a socket in a new private
            directory for ``unix:``, ``127.0.0.1:0`` for TCP), ``"unix"``/``"tcp"`` to choose, or
            an explicit ``unix:/path`` or ``host:port`` (port 0: any free one).

    Raises:
        UsageError: a negative RTT, a bandwidth below 1 byte/s, or an address that is neither
            ``unix:`` nor ``host:port``.
    """

    def __init__(
        self, target: str, rtt_s: float = 0.0, bandwidth: float | None = None, listen: str | None = None
    ) -> None:
        if not rtt_s >= 0:
            raise UsageError(f"relay RTT must be >= 0 s, got {rtt_s}")
        if bandwidth is not None and not bandwidth >= 1:
            raise UsageError(f"relay bandwidth must be >= 1 byte/s, got {bandwidth}")
        if unix_path(target) is None:
            _split_address(target)
        if listen not in (None, "unix", "tcp") and unix_path(listen or "") is None:
            _split_address(listen or "")
        self.target = target
        self.rtt_s = rtt_s
        self.bandwidth = bandwidth
        self.stats = LinkStats()
        kind = listen or ("unix" if unix_path(target) is not None else "tcp")
        self._listen = kind
        self._dir: Path | None = None
        self.address = ""
        """Where clients connect (``unix:/path`` or ``127.0.0.1:PORT``); set by ``start``."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    # ---- any thread

    def start(self) -> Relay:
        """Listen and serve on the relay's own thread; returns once ``address`` accepts.

        Raises:
            OSError: the listening address cannot be bound.
        """
        if self._thread is not None:
            raise RuntimeError("the relay is already started")
        started = threading.Event()
        outcome: list[BaseException | str] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                outcome.append(loop.run_until_complete(self._open()))
            except BaseException as e:  # reported to start() on the caller's thread
                outcome.append(e)
            started.set()
            if isinstance(outcome[0], str):
                loop.run_forever()
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=serve, name="splitlm-relay", daemon=True)
        self._thread.start()
        if not started.wait(START_TIMEOUT_S):
            raise RuntimeError("the relay did not start listening")
        if not isinstance(outcome[0], str):
            self._thread.join()
            self._thread = None
            self._cleanup_dir()
            raise outcome[0]
        self.address = outcome[0]
        log.info("relay %s -> %s, RTT %.1f ms, bandwidth %s", self.address, self.target,
                 self.rtt_s * 1e3, "uncapped" if self.bandwidth is None else f"{self.bandwidth:.0f} B/s")
        return self

    def stop(self) -> None:
        """Close the listener and every connection; wait for the relay's thread. Idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop already closed
                asyncio.run_coroutine_threadsafe(self._close(), loop).result(START_TIMEOUT_S)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(START_TIMEOUT_S)
        self._thread = None
        self._loop = None
        self._cleanup_dir()

    def __enter__(self) -> Relay:
        """Start unless already started (``start`` first, to handle its errors apart)."""
        return self if self._thread is not None else self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _cleanup_dir(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    # ---- the relay's loop

    async def _open(self) -> str:
        if self._listen == "unix" or self._listen.startswith("unix:"):
            if self._listen == "unix":
                self._dir = Path(tempfile.mkdtemp(prefix="splitlm-relay-"))
                path = self._dir / "relay.sock"
            else:
                path = Path(self._listen[len("unix:"):])
            self._server = await asyncio.start_unix_server(self._accept, path=str(path))
            return f"unix:{path}"
        host, port = ("127.0.0.1", 0) if self._listen == "tcp" else _split_address(self._listen)
        self._server = await asyncio.start_server(self._accept, host, port)
        sock = self._server.sockets[0]
        bound_host, bound_port = sock.getsockname()[:2]
        return f"[{bound_host}]:{bound_port}" if sock.family == socket.AF_INET6 else f"{bound_host}:{bound_port}"

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        for w in list(self._writers):
            w.close()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _connect_target(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        path = unix_path(self.target)
        if path is not None:
            return await asyncio.open_unix_connection(str(path))
        host, port = _split_address(self.target)
        return await asyncio.open_connection(host, port)

    async def _accept(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        """One connection, from accept to close (a task of asyncio's stream server)."""
        task = asyncio.current_task()
        assert task is not None  # a stream server runs each client in a task
        self._tasks.add(task)
        self._writers.add(c_writer)
        self.stats.connections += 1
        self.stats.open_connections += 1
        try:
            await self._forward(c_reader, c_writer)
        except asyncio.CancelledError:
            pass  # the relay is stopping; asyncio's stream server logs a task ending cancelled
        finally:
            self._writers.discard(c_writer)
            c_writer.close()
            self.stats.open_connections -= 1
            self._tasks.discard(task)

    async def _forward(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        try:
            t_reader, t_writer = await self._connect_target()
        except OSError as e:
            log.warning("relay: cannot reach %s: %s", self.target, e)
            return
        self._writers.add(t_writer)
        half = self.rtt_s / 2
        pumps = [
            asyncio.create_task(self._pump(c_reader, t_writer, _Direction(half, self.bandwidth, True))),
            asyncio.create_task(self._pump(t_reader, c_writer, _Direction(half, self.bandwidth, False))),
        ]
        try:
            # either side ending ends the connection: the first pump to finish has delivered
            # what was in flight its way; the other is cancelled and both sides are closed
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for p in pumps:
                p.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._writers.discard(t_writer)
            t_writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, d: _Direction) -> None:
        """Read from one side, deliver to the other at each chunk's due time, in order."""
        deliver = asyncio.create_task(self._deliver(writer, d))
        try:
            while True:
                try:
                    data = await reader.read(CHUNK_BYTES)
                except (ConnectionError, OSError):
                    data = b""
                if not data:
                    break
                now = time.monotonic()
                step = PIECE_BYTES if d.bandwidth is not None else len(data)
                for i in range(0, len(data), step):
                    piece = data[i : i + step]
                    await d.queue.put((d.due(now, len(piece)), piece))
            await d.queue.put(None)
            await deliver  # what is in flight arrives before the connection closes
        finally:
            deliver.cancel()

    async def _deliver(self, writer: asyncio.StreamWriter, d: _Direction) -> None:
        while (item := await d.queue.get()) is not None:
            due, data = item
            # asyncio may wake a timer a hair early: sleep until the due time has really passed
            while (left := due - time.monotonic()) > 0:
                await asyncio.sleep(left)
            writer.write(data)
            try:
                await writer.drain()
            except (ConnectionError, OSError):
                return
            if d.up:
                self.stats.bytes_up += len(data)
            else:
                self.stats.bytes_down += len(data)
