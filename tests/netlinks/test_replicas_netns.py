"""Three replicas, each a daemon in its own network namespace behind a veth pair (issue 14 part
6): a drained replica (health NOT_SERVING) gets no new sessions; the replica holding a session is
killed -9 mid-reply and the reply completes identically on another, over real links.

Root only; skipped with the reason otherwise.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from splitlm.shared.client import replica_target
from splitlm.shared.generation import SplitPipeline
from splitlm.shared.launcher import OwnedDaemon

from ..netns import Netns, netns_unavailable
from ..reliability.helpers import (
    PROMPT,
    connect,
    reply_with_its_replica_killed,
    run_ids,
    sessions_per_replica,
    wait_until,
)

pytestmark = pytest.mark.skipif(netns_unavailable() is not None, reason=str(netns_unavailable()))
log = logging.getLogger(__name__)

ARGS = ("--split", "2:4", "--threads", "1", "--insecure")  # --insecure: the tests' own veth network


@pytest.fixture(scope="module")
def replicas(
    tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[OwnedDaemon]]:
    root = tmp_path_factory.mktemp("netns-replicas")
    with Netns() as net:
        made = []
        for i in range(3):
            ns = net.namespace()
            d = net.daemon(ns, ["--model", str(tiny_models["llama"]), *ARGS], log_path=root / f"r{i}.log")
            d.start(180, poll_s=0.2)
            made.append(d)
        yield made



def test_a_replica_turned_not_serving_gets_no_new_sessions(
    replicas: list[OwnedDaemon], tiny_models: dict[str, Path]
) -> None:
    model = tiny_models["llama"]
    target = replica_target([d.address for d in replicas])
    assert target.startswith("ipv4:10.211.") and target.count(",") == 2
    held = connect(replicas[2].address, model)
    split = connect(target, model)
    own = held.pipeline()
    pipes: list[SplitPipeline] = []
    try:
        replicas[2].proc.send_signal(signal.SIGUSR1)  # health NOT_SERVING; its session goes on
        wait_until(
            lambda: all(split.client.info().sessions_open == 0 for _ in range(6)),
            what="the NOT_SERVING replica out of the rotation",
        )
        pipes = [split.pipeline() for _ in range(4)]
        got = sessions_per_replica(replicas)
        assert got[2] == 1 and got[0] + got[1] == 4, got  # only its own session
        run_ids(own, PROMPT, 2)
    finally:
        replicas[2].proc.send_signal(signal.SIGUSR2)
        for p in pipes:
            p.close()
        own.close()
        held.close()
        split.close()
    wait_until(lambda: sessions_per_replica(replicas) == [0, 0, 0], what="sessions closed")


def test_kill9_of_a_replica_in_its_namespace_mid_reply_completes_identically(
    replicas: list[OwnedDaemon], tiny_models: dict[str, Path]
) -> None:
    """Runs last: it kills one replica of the module's three."""
    n, kill_at = 24, 8
    moved = reply_with_its_replica_killed(
        replicas, replica_target([d.address for d in replicas]), tiny_models["llama"], n, kill_at
    )
    assert moved.identical(), "the reply or a step's logits differ after moving replicas"
    assert len(moved.session.resumes) == 1 and moved.session.resumes[0].attempts == 1
    assert moved.survivor_sessions == 1
    log.info("netns: replica %d killed after token %d, moved in %.0f ms",
             moved.victim, kill_at, moved.session.resumes[0].downtime_s * 1e3)
