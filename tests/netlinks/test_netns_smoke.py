"""The namespace harness itself (``tests/netns.py``): a daemon in a namespace answers over a veth.

Root only; skipped with the reason otherwise.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from splitlm.shared.client import TrunkClient

from ..netns import Netns, netns_unavailable

pytestmark = pytest.mark.skipif(netns_unavailable() is not None, reason=str(netns_unavailable()))


def test_daemon_in_a_namespace_answers_info_over_the_veth(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    with Netns() as net:
        ns = net.namespace()
        names = [ns.name]
        d = net.daemon(ns, ["--model", str(tiny_models["llama"]), "--threads", "1", "--insecure"],
                       log_path=tmp_path / "d.log")
        d.start(120, poll_s=0.2)
        assert d.address.startswith(ns.address + ":")
        client = TrunkClient(d.address)
        try:
            info = client.info()
        finally:
            client.close()
        assert info.plan.num_layers == 6
        # the daemon really runs inside: its address exists only in the namespace
        assert ns.address in ns.run("ip", "-4", "-o", "addr").stdout
        assert ns.address not in subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    # everything the harness made is gone
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert all(n not in left for n in names)
    assert ns.host_dev not in subprocess.run(["ip", "link"], capture_output=True, text=True).stdout


def test_teardown_runs_when_the_test_fails(tmp_path: Path) -> None:
    with pytest.raises(ZeroDivisionError), Netns() as net:
        ns = net.namespace()
        a, b = net.namespace(), net.namespace()
        net.link(a, b)
        1 / 0  # noqa: B018 - the failure under test
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert all(n.name not in left for n in (ns, a, b))
