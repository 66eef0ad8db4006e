"""Replica sets: several daemons serving the same stage, as one gRPC target.

A stage served by several daemons (same model, same layer range, same precision) is one gRPC
channel whose target lists them all. gRPC does the rest itself: its ``round_robin`` policy
connects to every address and hands each new call (a session is one call: one bidirectional
stream) to the next replica that is READY, and its client-side health checking
(``grpc.health.v1``, the daemon's per-service status) keeps a replica that reports NOT_SERVING,
a daemon draining on SIGTERM, out of the rotation. A session stays on the replica its stream
went to; when that replica dies, ``FailoverSession`` reopens on the same channel and
``round_robin`` hands it to a live one, where the replay rebuilds its cache.

Targets that are a replica set:

- ``ipv4:10.0.0.1:50051,10.0.0.2:50051`` and ``ipv6:[::1]:50051,[::1]:50052``: gRPC's own
  address lists;
- ``unix:/run/a.sock,/run/b.sock``: the same for unix sockets (gRPC's ``unix:`` resolver splits on
  commas too, tests/shared/test_replicas.py checks it; so a socket path with a comma cannot be
  given to gRPC at all);
- ``dns:///name:port``: every address the name resolves to, re-resolved when connections fail.

``replica_target`` builds such a target from separate addresses (the client's route code calls
it for daemons that serve the same range). A plain ``host:port`` or ``unix:/path`` stays what it
always was: one daemon, gRPC's default ``pick_first``, no service config.

Who may call: anyone; pure functions apart from resolving host names in ``replica_target``.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Sequence

from ..protos import trunk_pb2 as pb
from .errors import UsageError

HEALTH_SERVICE: str = pb.DESCRIPTOR.services_by_name["Trunk"].full_name
"""The name the daemon reports health under (``daemon.server.set_health``: the trunk service's
full name in the proto). Health is set for "" too, but the per-service status is the one a
replica that serves something else would not have."""

SOCKADDR_SCHEMES = ("ipv4", "ipv6", "unix")
"""gRPC resolvers that take a comma-separated list of addresses."""

DNS_REPLICA_TRIES = 4
"""How many replicas a new session tries when the target's size is unknown (``dns:``) and each
one picked refuses it."""

REPLICA_ROUND_PAUSE_S = 0.2
"""The pause between two rounds of tries at a replica set whose every replica picked so far
refused a new session: round_robin only picks replicas that are connected and SERVING, so one
still connecting (a channel just made, a replica just restarted) joins the rotation only after
its connect and first health answer, which the second round, run at once, would miss too."""


def service_config(health_service: str = HEALTH_SERVICE) -> str:
    """The channel's service config for a replica set: ``round_robin`` over every address, each
    address in the rotation only while its health for ``health_service`` is SERVING."""
    return json.dumps({
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": health_service},
    })


def _scheme(target: str) -> str | None:
    head, sep, _ = target.partition(":")
    return head if sep and head in (*SOCKADDR_SCHEMES, "dns") else None


def is_replica_set(target: str) -> bool:
    """Whether ``target`` may stand for several daemons: a sockaddr list with more than one
    address, or a ``dns:`` target (its name may resolve to several)."""
    scheme = _scheme(target)
    if scheme == "dns":
        return True
    return scheme is not None and len(replica_addresses(target) or ()) > 1


def replica_addresses(target: str) -> tuple[str, ...] | None:
    """The single-daemon addresses of ``target``, each usable as a ``TrunkClient`` address of
    its own (``Info`` of one replica, its session count); None for a ``dns:`` target, whose
    addresses only the resolver knows."""
    scheme = _scheme(target)
    if scheme == "dns":
        return None
    if scheme is None:
        return (target,)
    rest = target[len(scheme) + 1:]
    if scheme == "unix" and rest.startswith("//"):
        rest = rest[2:]  # unix:///abs/path is unix:/abs/path
    return tuple(f"{scheme}:{part}" for part in rest.split(",") if part)


def _split_host_port(address: str) -> tuple[str, str]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise UsageError(f"{address!r} is not host:port, unix:/path, ipv4:..., ipv6:... or dns:///name:port")
    return host.strip("[]"), port


def _members(address: str) -> list[tuple[str, str]]:
    """``(scheme, address-within-scheme)`` of each daemon ``address`` names; a host name is
    resolved here (a channel target lists addresses, not names)."""
    scheme = _scheme(address)
    if scheme == "dns":
        raise UsageError(
            f"{address} is a dns: target, which is a replica set by itself: give it alone, "
            "not together with other addresses"
        )
    if scheme is not None:
        return [(scheme, a.split(":", 1)[1]) for a in replica_addresses(address) or ()]
    host, port = _split_host_port(address)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except OSError as e:
            raise UsageError(f"cannot resolve {host} (in {address}): {e}") from None
        found = []
        for family, *_, sockaddr in infos:
            fam = "ipv6" if family == socket.AF_INET6 else "ipv4"
            found.append((fam, f"[{sockaddr[0]}]:{port}" if fam == "ipv6" else f"{sockaddr[0]}:{port}"))
        return list(dict.fromkeys(found))
    return [("ipv6", f"[{ip}]:{port}")] if ip.version == 6 else [("ipv4", f"{ip}:{port}")]


def replica_target(addresses: Sequence[str]) -> str:
    """One gRPC target for daemons that serve the same stage: ``round_robin`` spreads new
    sessions over them (``TrunkClient`` sets it up for such a target).

    A single address comes back as it was (one daemon, today's behaviour). Several must be of
    one kind: unix sockets (``unix:/a,/b``), IPv4 (``ipv4:a:p,b:p``) or IPv6; host names are
    resolved now, to every address they have. Duplicates count once.

    Raises:
        UsageError: no address; kinds mixed (unix with TCP, IPv4 with IPv6; the one that differs
            is named); a ``dns:`` target among others; a host name that does not resolve.
    """
    if not addresses:
        raise UsageError("a replica set needs at least one address")
    if len(addresses) == 1:
        return addresses[0]
    members: list[tuple[str, str]] = []
    origin: dict[str, str] = {}
    for address in addresses:
        for scheme, member in _members(address):
            members.append((scheme, member))
            origin.setdefault(scheme, address)
    if len(origin) > 1:
        first, *others = origin.items()
        raise UsageError(
            f"replicas of one stage must all be reached the same way: {others[0][1]} is "
            f"{others[0][0]} but {first[1]} is {first[0]} (gRPC's address lists hold one kind)"
        )
    unique = list(dict.fromkeys(m for _, m in members))
    scheme = members[0][0]
    if len(unique) == 1 and len(set(addresses)) == 1:
        return addresses[0]
    return f"{scheme}:{','.join(unique)}"
