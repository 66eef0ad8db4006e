"""The gRPC server around the trunk service: health, reflection, listen addresses, graceful stop."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..protos import trunk_pb2 as pb
from ..shared.client import channel_options
from ..shared.paths import unix_path
from .handlers import add_trunk_service
from .service import TrunkService

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Trunk"].full_name


def prepare_unix_socket(address: str) -> Path | None:
    """Make the socket's directory and remove a stale socket file left by a dead daemon."""
    path = unix_path(address)
    if path is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.is_socket():
        path.unlink()
    return path


async def serve(service: TrunkService, listen: list[str], grace_s: float = 10.0) -> None:
    """Serve until SIGTERM or SIGINT, then let in-flight steps finish within ``grace_s``."""
    server = grpc.aio.server(options=channel_options(service.limits.max_message_bytes))
    add_trunk_service(service, server)  # undecodable messages -> INVALID_ARGUMENT
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    sockets = []
    for address in listen:
        sock = prepare_unix_socket(address)
        if sock is not None:
            sockets.append(sock)
        server.add_insecure_port(address)
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving %s on %s", service.plan.model_id, ", ".join(listen))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("stopping: %d sessions open, grace %.0f s", len(service.sessions), grace_s)
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.stop(grace_s)
        for sock in sockets:
            if sock.is_socket():
                sock.unlink()
        log.info("stopped")


def make_executor() -> ThreadPoolExecutor:
    """One compute thread per device: steps of different sessions never race on the weights."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="trunk-compute")


def env_threads() -> int | None:
    value = os.environ.get("SPLITLM_THREADS")
    return int(value) if value else None
