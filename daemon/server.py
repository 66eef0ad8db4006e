"""The gRPC server around the trunk service: health, reflection, listen addresses, graceful stop."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..protos import trunk_pb2 as pb
from ..shared.client import KEEPALIVE_MS, channel_options
from ..shared.errors import SplitlmError
from ..shared.paths import runtime_dir, unix_path
from .auth import Security
from .handlers import add_trunk_service
from .health import build_health_server, listen_health
from .notify import Notifier, heartbeat
from .prometheus import MetricsServer
from .service import TrunkService

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Trunk"].full_name


SOCKET_MODE = 0o660
"""A unix socket is read-write for the daemon's user and group, never for others (connecting
needs write permission); the umask can take more away, never add."""
DIR_MODE = 0o750
"""Directories the daemon creates on the way to its socket: the group may reach the socket, only
the owner may add or remove files there (as systemd's ``RuntimeDirectoryMode=0750``)."""


def prepare_unix_socket(address: str) -> Path | None:
    """Make the socket's missing directories (each ``DIR_MODE`` less the umask, not only the
    last; the user's runtime dir itself 0700, as XDG wants it) and remove a stale socket file
    left by a dead daemon. Directories that exist are left as they are.
    """
    path = unix_path(address)
    if path is None:
        return None
    user_runtime = None if os.environ.get("RUNTIME_DIRECTORY") else runtime_dir().parent
    missing = [d for d in (path.parent, *path.parent.parents) if not d.exists()]
    for d in reversed(missing):  # mkdir applies the umask
        d.mkdir(mode=0o700 if d == user_runtime else DIR_MODE, exist_ok=True)
    if path.is_socket():
        path.unlink()
    return path


@contextmanager
def socket_umask() -> Iterator[None]:
    """The process umask, plus the bits ``SOCKET_MODE`` leaves out, while grpc binds a socket.

    grpc binds *and listens* on a unix socket in ``add_insecure_port``, before ``start``, and the
    kernel checks permissions at ``connect``: a socket born 0777 and chmod-ed afterwards would let
    another user queue a connection in between that the server serves once started. Under this
    umask the socket is born with its final mode. The umask is process-wide: a file another thread
    creates meanwhile gets a stricter mode, never a looser one. Loop thread, at start-up only.
    """
    old = os.umask(0o777)  # reading the umask means setting it: set the strictest meanwhile
    os.umask(old | (0o777 & ~SOCKET_MODE))
    try:
        yield
    finally:
        os.umask(old)


def listen_on(server: grpc.aio.Server, security: Security, listen: list[str]) -> list[Path]:
    """Bind every address, unix sockets with their final mode from birth; their paths.

    Raises:
        SplitlmError: an address cannot be bound (in use, no permission).
    """
    sockets = []
    for address in listen:
        try:
            sock = prepare_unix_socket(address)
            with socket_umask() if sock is not None else nullcontext():
                bound = security.add_port(server, address)
        except RuntimeError as e:
            bound, why = 0, str(e)
        except OSError as e:  # a directory on the way cannot be made
            bound, why = 0, f"{e.strerror or e}: {e.filename}"
        else:
            why = "address in use or not permitted"
        if not bound:
            raise SplitlmError(f"cannot listen on {address}: {why}")
        if sock is not None:
            sockets.append(sock)
    return sockets


def server_options(max_message_bytes: int, keepalive_s: float) -> list[tuple[str, int]]:
    """Message limits, and keepalive: the server pings connections every ``keepalive_s`` and
    drops a peer that does not answer within half that (at most 20 s), so a client that froze or
    lost its network frees its session (tests/integration/test_lifecycle.py).
    """
    timeout_ms = int(max(1.0, min(20.0, keepalive_s / 2)) * 1000)
    opts = dict(channel_options(max_message_bytes))
    opts.update({
        "grpc.keepalive_time_ms": int(keepalive_s * 1000),
        "grpc.keepalive_timeout_ms": timeout_ms,
        # any unanswered ping (a flow-control BDP ping may be the one in flight) ends the connection
        # as fast as a keepalive would; grpc's default waits a minute
        "grpc.http2.ping_timeout_ms": timeout_ms,
        "grpc.keepalive_permit_without_calls": 1,
        # accept the clients' keepalive pings on an idle session: grpc's default policy wants
        # 5 min between pings without data and sends GOAWAY "too_many_pings" after two closer
        # ones, which dropped any session left idle for ~90 s
        "grpc.http2.min_ping_interval_without_data_ms": min(
            KEEPALIVE_MS, int(keepalive_s * 1000)
        ) // 2,
    })
    return list(opts.items())


def session_status(service: TrunkService, listen: list[str]) -> str:
    """The ``STATUS=`` line systemd shows: model, plan, sessions."""
    p = service.plan
    return (
        f"serving {p.model_id} layers {p.trunk_start}:{p.trunk_end} of {p.num_layers} on {p.device}; "
        f"{len(service.sessions)} sessions; {', '.join(listen)}"
    )


async def serve(
    service: TrunkService,
    listen: list[str],
    grace_s: float = 10.0,
    *,
    security: Security | None = None,
    notifier: Notifier | None = None,
    keepalive_s: float = 30.0,
    metrics: str | None = None,
    health_listen: list[str] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then let in-flight steps finish within ``grace_s``.

    Args:
        security: TLS for TCP addresses and the token interceptor (``check_exposure`` made it).
        notifier: systemd notifications: READY=1 once listening, WATCHDOG=1 from this loop,
            STATUS= lines, STOPPING=1 at shutdown.
        metrics: ``host:port`` to serve Prometheus metrics on (None: off).
        health_listen: addresses of a plaintext, health-only server (``daemon.health``) for
            probes that cannot do TLS or tokens; it opens and closes with the main server.

    Raises:
        SplitlmError: an address cannot be bound (in use, no permission).
    """
    security = security or Security()
    notifier = notifier or Notifier({})
    server, health_servicer = build_server(service, security, keepalive_s)
    sockets = listen_on(server, security, listen)
    health_server = build_health_server(health_servicer) if health_listen else None
    if health_server is not None:
        listen_health(health_server, list(health_listen or ()))
    exporter = await start_metrics(metrics, service)
    Drain(health_servicer, notifier).install()  # before the port opens: a USR1 never kills it
    await server.start()
    if health_server is not None:
        await health_server.start()
    await set_health(health_servicer, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving %s on %s (%s)", service.plan.model_id, ", ".join(listen), describe_security(security))
    notifier.ready(session_status(service, listen))
    beat = asyncio.create_task(heartbeat(notifier, lambda: session_status(service, listen)))
    try:
        await until_signalled()
    finally:
        log.info("stopping: %d sessions open, grace %.0f s", len(service.sessions), grace_s)
        beat.cancel()  # systemd stops watching once STOPPING=1 arrives
        notifier.stopping(
            f"stopping: {len(service.sessions)} sessions get up to {grace_s:g} s to finish their step"
        )
        await set_health(health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING)
        await stop_serving(service, server, grace_s, exporter, sockets)
        if health_server is not None:  # last: probes see NOT_SERVING until the end
            await health_server.stop(0)
        log.info("stopped")


def build_server(
    service: TrunkService, security: Security, keepalive_s: float
) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """The gRPC server with the trunk service, health and reflection on it; not bound yet."""
    server = grpc.aio.server(
        options=server_options(service.limits.max_message_bytes, keepalive_s),
        interceptors=security.interceptors(),
    )
    add_trunk_service(service, server)  # undecodable messages -> INVALID_ARGUMENT
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    return server, health_servicer


async def start_metrics(metrics: str | None, service: TrunkService) -> MetricsServer | None:
    """The Prometheus exporter on ``metrics`` (``host:port``), started; None when off.

    Raises:
        SplitlmError: the address cannot be bound.
    """
    if not metrics:
        return None
    exporter = MetricsServer(metrics, service.metrics_snapshot)
    try:
        await exporter.start()
    except OSError as e:
        raise SplitlmError(f"cannot serve metrics on {metrics}: {e.strerror or e}") from None
    return exporter


async def set_health(
    health_servicer: health.aio.HealthServicer, status: int
) -> None:
    """Report ``status`` (a ``HealthCheckResponse.ServingStatus`` value: an int, as grpc's own
    ``set`` takes it) for the server as a whole ("") and for the trunk service."""
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, status)


def describe_security(security: Security) -> str:
    """What the serving log line says about who may connect."""
    on = [w for w, enabled in (("TLS on TCP", security.tls), ("token required", security.token)) if enabled]
    return ", ".join(on) or "no TLS, no token"


class Drain:
    """Take the daemon out of its replica set's rotation and back, without stopping it.

    ``SIGUSR1`` sets the trunk's health NOT_SERVING: clients that reach it as one replica of
    several (gRPC's round_robin with health checking, ``shared.replicas``) send it no new
    sessions, while the sessions it holds go on to their end; ``SIGUSR2`` sets SERVING again.
    An operator drains a replica this way before maintenance, so stopping it later cuts no
    session (SIGTERM alone also turns NOT_SERVING first, but then ends the open sessions, which
    their clients rebuild elsewhere by replay). A client given this daemon's address alone does
    not health-check and still opens sessions here. Loop only.
    """

    def __init__(self, health_servicer: health.aio.HealthServicer, notifier: Notifier) -> None:
        self.health = health_servicer
        self.notifier = notifier
        self.draining = False
        self._tasks: set[asyncio.Task[None]] = set()

    def install(self) -> None:
        """SIGUSR1 drains, SIGUSR2 undrains (the loop's signal handlers)."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGUSR1, self.signal, True)
        loop.add_signal_handler(signal.SIGUSR2, self.signal, False)

    def signal(self, draining: bool) -> None:
        """Called from the loop's signal handler: set the health off the handler."""
        task = asyncio.get_running_loop().create_task(self.set(draining))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def set(self, draining: bool) -> None:
        self.draining = draining
        status = health_pb2.HealthCheckResponse.NOT_SERVING if draining else health_pb2.HealthCheckResponse.SERVING
        await set_health(self.health, status)
        text = (
            "draining (SIGUSR1): health NOT_SERVING, no new sessions from replica-set clients; "
            "open sessions go on" if draining else "serving again (SIGUSR2): health SERVING"
        )
        log.info("%s", text)
        self.notifier.status(text)


async def until_signalled() -> None:
    """Return once SIGTERM or SIGINT arrives."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def stop_serving(
    service: TrunkService,
    server: grpc.aio.Server,
    grace_s: float,
    exporter: MetricsServer | None,
    sockets: list[Path],
) -> None:
    """Refuse new sessions, end the monitor streams, give in-flight steps ``grace_s``, then
    close the exporter and remove the unix sockets."""
    service.begin_shutdown()
    await service.monitor.close()  # monitor streams never end by themselves: end them first
    await server.stop(grace_s)
    if exporter is not None:
        await exporter.close()
    for sock in sockets:
        if sock.is_socket():
            sock.unlink()


def make_executor() -> ThreadPoolExecutor:
    """One compute thread per device: steps of different sessions never race on the weights."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="trunk-compute")

