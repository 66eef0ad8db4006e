"""Replica-set targets (``splitlm.shared.replicas``): what ``replica_target`` builds from separate
addresses, and that gRPC itself accepts each form: ``unix:`` comma lists included, which gRPC
documents only for ``ipv4:``/``ipv6:``, checked here against real servers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from splitlm.shared.client import TrunkClient, replica_target
from splitlm.shared.errors import UsageError
from splitlm.shared.replicas import (
    HEALTH_SERVICE,
    is_replica_set,
    replica_addresses,
    service_config,
)


def test_one_address_is_left_as_it_is() -> None:
    for a in ("unix:/run/t.sock", "127.0.0.1:50051", "localhost:50051", "dns:///trunk:50051"):
        assert replica_target([a]) == a
    assert not is_replica_set("unix:/run/t.sock") and not is_replica_set("127.0.0.1:50051")
    assert not is_replica_set("ipv4:127.0.0.1:1")  # a list of one is one daemon
    assert replica_target(["127.0.0.1:1", "127.0.0.1:1"]) == "127.0.0.1:1"


def test_several_addresses_become_one_sockaddr_list() -> None:
    assert replica_target(["unix:/a.sock", "unix:///b.sock"]) == "unix:/a.sock,/b.sock"
    assert replica_target(["10.0.0.1:5", "10.0.0.2:5", "10.0.0.1:5"]) == "ipv4:10.0.0.1:5,10.0.0.2:5"
    assert replica_target(["[::1]:5", "ipv6:[::1]:6"]) == "ipv6:[::1]:5,[::1]:6"
    assert replica_target(["ipv4:10.0.0.1:5,10.0.0.2:5", "10.0.0.3:5"]) == "ipv4:10.0.0.1:5,10.0.0.2:5,10.0.0.3:5"
    # a host name is resolved to its addresses (localhost: 127.0.0.1, maybe ::1 too)
    target = replica_target(["localhost:7", "127.0.0.2:7"]) if _v4_only_localhost() else None
    if target is not None:
        assert target == "ipv4:127.0.0.1:7,127.0.0.2:7"
    assert is_replica_set("unix:/a.sock,/b.sock") and is_replica_set("dns:///trunk:50051")
    assert replica_addresses("ipv4:10.0.0.1:5,10.0.0.2:5") == ("ipv4:10.0.0.1:5", "ipv4:10.0.0.2:5")
    assert replica_addresses("unix:/a.sock,/b.sock") == ("unix:/a.sock", "unix:/b.sock")
    assert replica_addresses("dns:///trunk:50051") is None


def _v4_only_localhost() -> bool:
    import socket

    return {i[0] for i in socket.getaddrinfo("localhost", 7, type=socket.SOCK_STREAM)} == {socket.AF_INET}


@pytest.mark.parametrize(
    ("addresses", "named"),
    [
        (["unix:/a.sock", "127.0.0.1:5"], "127.0.0.1:5"),
        (["10.0.0.1:5", "[::1]:5"], "[::1]:5"),
        (["dns:///trunk:5", "10.0.0.1:5"], "dns:///trunk:5"),
        (["not-an-address", "10.0.0.1:5"], "not-an-address"),
        ([], "at least one"),
    ],
)
def test_what_cannot_be_one_replica_set_is_refused_by_name(addresses: list[str], named: str) -> None:
    with pytest.raises(UsageError, match=named.replace("[", r"\[").replace("]", r"\]")):
        replica_target(addresses)


def test_the_service_config_asks_for_round_robin_and_the_trunk_health() -> None:
    # the name daemon.server.set_health reports under (the integration tests see a real daemon's
    # NOT_SERVING take it out of the rotation)
    assert HEALTH_SERVICE == "splitlm.v1.Trunk"
    cfg = json.loads(service_config())
    assert cfg == {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": "splitlm.v1.Trunk"},
    }


WHO = "/splitlm.test.Who/Who"
"""A method each test server answers with its own index: where a call went."""


@pytest.fixture
def health_servers(tmp_path: Path) -> Iterator[list[tuple[str, health.HealthServicer]]]:
    """Three plain gRPC servers with the health service and a ``Who`` method, on unix sockets:
    enough to see where a channel's calls go."""
    made = []
    for i in range(3):
        server = grpc.server(futures.ThreadPoolExecutor(2))
        servicer = health.HealthServicer()
        servicer.set(HEALTH_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        answer = bytes([i])
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "splitlm.test.Who", {"Who": grpc.unary_unary_rpc_method_handler(lambda req, ctx, a=answer: a)}
        ),))
        address = f"unix:{tmp_path / f'h{i}.sock'}"
        server.add_insecure_port(address)
        server.start()
        made.append((address, servicer, server))
    yield [(a, s) for a, s, _ in made]
    for *_, server in made:
        server.stop(None)


def _who(channel: grpc.Channel, n: int) -> list[int]:
    """Which server answered each of ``n`` calls."""
    who = channel.unary_unary(WHO)
    return [who(b"", timeout=5)[0] for _ in range(n)]


def test_grpc_spreads_calls_over_a_unix_list_and_skips_a_not_serving_one(
    health_servers: list[tuple[str, health.HealthServicer]],
) -> None:
    """gRPC's ``unix:`` resolver splits on commas like ``ipv4:``; with the client's service
    config its calls go round the list, and a server whose trunk health is NOT_SERVING drops
    out of it."""
    target = replica_target([a for a, _ in health_servers])
    assert target.count(",") == 2
    client = TrunkClient(target)
    try:
        grpc.channel_ready_future(client.channel).result(timeout=10)
        for _ in range(200):  # until every subchannel has connected and reported SERVING
            if set(_who(client.channel, 3)) == {0, 1, 2}:
                break
        assert sorted(_who(client.channel, 9)) == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # round robin
        health_servers[1][1].set(HEALTH_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        # the channel learns it from its health watch; once it has, server 1 gets nothing
        for _ in range(200):
            if 1 not in _who(client.channel, 3):
                break
        assert sorted(_who(client.channel, 8)) == [0, 0, 0, 0, 2, 2, 2, 2]
        health_servers[1][1].set(HEALTH_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        for _ in range(200):
            if 1 in _who(client.channel, 3):
                break
        assert set(_who(client.channel, 6)) == {0, 1, 2}  # back in the rotation
    finally:
        client.close()


def test_a_single_address_keeps_pick_first(
    health_servers: list[tuple[str, health.HealthServicer]],
) -> None:
    """One daemon's address stays on gRPC's default policy, no service config: every call goes
    to the one server (as before replica sets existed)."""
    client = TrunkClient(health_servers[2][0])
    try:
        assert not client.replicas
        assert set(_who(client.channel, 6)) == {2}
    finally:
        client.close()


def test_replica_set_of_clients_keeps_the_first_ones_settings(
    health_servers: list[tuple[str, health.HealthServicer]],
) -> None:
    """``TrunkClient.replica_set``: the route's hook for a stage served by several daemons."""
    from splitlm.shared.deadline import StepDeadline

    deadline = StepDeadline(floor_s=7.0)
    singles = [TrunkClient(a, source="--trunk", step_deadline=deadline, connect_timeout_s=3.0) for a, _ in health_servers]
    both = TrunkClient.replica_set(singles)
    try:
        assert both.replicas and both.replica_count == 3
        assert both.address == replica_target([a for a, _ in health_servers])
        assert both.step_deadline is deadline and both.connect_timeout_s == 3.0
        grpc.channel_ready_future(both.channel).result(timeout=10)
        for _ in range(200):
            if set(_who(both.channel, 3)) == {0, 1, 2}:
                break
        assert set(_who(both.channel, 6)) == {0, 1, 2}
    finally:
        both.close()
        for c in singles:
            c.close()
