"""The one owned-daemon launcher (``shared.launcher``) with a real ``splitlm-trunkd`` process:
a private socket, ready when ``Info`` answers, a clean stop; and a failed start that says why."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import pytest

from splitlm.shared.client import TrunkClient
from splitlm.shared.launcher import DaemonStartError, OwnedDaemon
from splitlm.shared.paths import unix_path


def test_private_socket_ready_then_clean_stop(tiny_models: dict[str, Path]) -> None:
    with OwnedDaemon(["--model", str(tiny_models["llama"]), "--split", "2:4", "--threads", "1"]) as d:
        sock = unix_path(d.address)
        assert sock is not None and sock.is_socket()
        assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700  # nobody else reaches the socket
        client = TrunkClient(d.address)
        try:
            assert (client.info().plan.trunk_start, client.info().plan.trunk_end) == (2, 4)
        finally:
            client.close()
        assert d.proc is not None and d.proc.poll() is None
    assert d.exit_code == 0 and d.proc.returncode == 0  # SIGTERM: a clean exit
    assert not sock.parent.exists()  # the private directory is gone
    assert "Traceback" not in d.final_log


def test_a_daemon_that_exits_while_starting_is_reported_with_its_log(tmp_path: Path) -> None:
    d = OwnedDaemon(["--model", str(tmp_path / "no-such-model")], name="the test's daemon")
    t0 = time.monotonic()
    with pytest.raises(DaemonStartError, match=r"the test's daemon exited with [1-9]\d* while starting") as e:
        d.start(timeout_s=120)
    assert time.monotonic() - t0 < 60  # seen when it exits, not at the timeout
    assert "no-such-model" in str(e.value)  # the log's tail says why
    assert d.stop() == d.exit_code != 0
