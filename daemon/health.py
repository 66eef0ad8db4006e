"""Health for probes that cannot speak the daemon's own port: a health-only server and a probe.

Kubernetes' ``grpc:`` probes (and most load balancers' health checks) connect in plaintext and
carry no token, while a daemon reachable from other hosts serves TLS and wants a token on every
call. ``--health-listen`` therefore opens a second gRPC server that carries ``grpc.health.v1``
alone: it answers SERVING or NOT_SERVING, never a trunk RPC, so it exposes nothing else. It shares
the main server's ``HealthServicer``, so both report the same status at every moment.

``splitlm-trunkd --health-check ADDR`` is the probe a container's HEALTHCHECK runs: one Check
call, the answer printed, exit 0 for SERVING and 1 for anything else.
"""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ..shared.errors import ExitCode, SplitlmError
from ..shared.paths import unix_path

log = logging.getLogger(__name__)

CHECK_METHOD = "/grpc.health.v1.Health/Check"

PROBE_TIMEOUT_S = 5.0
"""How long ``--health-check`` waits for an answer: well inside a container HEALTHCHECK's
usual timeout, long enough for a daemon busy with a prefill (the health RPC runs on the event
loop, which compute never blocks)."""


def build_health_server(servicer: health.aio.HealthServicer) -> grpc.aio.Server:
    """A gRPC server carrying only the health service ``servicer`` (shared with the main
    server), no interceptors: probes hold no token. Not bound yet. Loop thread."""
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return server


def listen_health(server: grpc.aio.Server, addresses: list[str]) -> None:
    """Bind ``addresses`` in plaintext (unix sockets included). Loop thread, before ``start``.

    Raises:
        SplitlmError: an address cannot be bound (in use, no permission).
    """
    for address in addresses:
        try:
            bound = server.add_insecure_port(address)
        except RuntimeError as e:
            raise SplitlmError(f"cannot listen for health checks on {address}: {e}") from None
        if not bound:
            raise SplitlmError(
                f"cannot listen for health checks on {address}: address in use or not permitted"
            )
    log.info("health checks (grpc.health.v1 only, plaintext, no token) on %s", ", ".join(addresses))


def check(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> tuple[ExitCode, str]:
    """Ask ``address`` for the overall health status (service ``""``).

    Returns:
        ``ExitCode.OK`` and ``"SERVING"``, or 1 and what was answered instead (NOT_SERVING,
        UNKNOWN) or why nothing was (the gRPC status code and its message).
    """
    target = f"unix:{unix_path(address)}" if unix_path(address) is not None else address
    with grpc.insecure_channel(target) as channel:
        rpc = channel.unary_unary(  # the stub's Check, typed (grpc_health's stubs leave it out)
            CHECK_METHOD,
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        try:
            reply = rpc(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        except grpc.RpcError as e:
            code = e.code() if isinstance(e, grpc.Call) else None
            details = (e.details() if isinstance(e, grpc.Call) else str(e)) or ""
            name = code.name if code is not None else "ERROR"
            first = details.splitlines()[0] if details else ""
            return ExitCode.FAILURE, f"{name}: {first}" if first else name
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    ok = reply.status == health_pb2.HealthCheckResponse.SERVING
    return (ExitCode.OK if ok else ExitCode.FAILURE), status
