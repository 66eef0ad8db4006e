"""``--weights`` on SmolLM2 through a real daemon: the split equals the full model at the same
precision (``splitlm compare``, greedy), the GGUF's own Q4_1/Q8_0 kept quantised included; a
client's own parts at another precision (int4 around the GGUF trunk) equal the full model at that
per-part assignment; a client expecting another trunk precision is refused clearly."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.conftest import Daemon, run_cli, start_daemon

pytestmark = pytest.mark.realmodel

PROMPT = "Explain in two sentences how a lighthouse works."


@pytest.fixture(scope="module", params=["bfloat16", "gguf"])
def weighted_daemon(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp(f"smol-{request.param}")
    d = start_daemon("smollm2", f"unix:{tmp / 'trunk.sock'}", tmp / "trunkd.log", "--weights", request.param)
    d.weights = request.param  # type: ignore[attr-defined]
    yield d
    assert d.stop() == 0


def test_split_equals_full_at_the_daemons_precision(weighted_daemon: Daemon) -> None:
    r = run_cli("compare", "--trunk", weighted_daemon.address, "--max-new-tokens", "32", "--json", PROMPT)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    a = out["agreement"]
    assert a["identical"], a
    assert a["full_tokens"] >= 16
    assert "Failed to load" not in r.stderr and "Warning" not in r.stderr  # torchao's import is quiet


def test_the_clients_parts_at_their_own_precision(weighted_daemon: Daemon) -> None:
    r = run_cli("compare", "--trunk", weighted_daemon.address, "--weights", "int4", "--max-new-tokens", "24",
                "--json", PROMPT)
    assert r.returncode == 0, r.stderr
    a = json.loads(r.stdout)["agreement"]
    assert a["identical"] and a["full_tokens"] >= 16, a


def test_another_trunk_precision_is_refused_before_loading(weighted_daemon: Daemon) -> None:
    r = run_cli("generate", "--trunk", weighted_daemon.address, "--trunk-weights", "float32", "--max-new-tokens",
                "4", PROMPT)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert f"the daemon's trunk runs with --weights {weighted_daemon.weights}" in r.stderr  # type: ignore[attr-defined]
    assert "cannot change the daemon's precision" in r.stderr
    assert weighted_daemon.proc.poll() is None
