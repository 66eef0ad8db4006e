"""The slow-link relay (``shared.relay``) between a real client and a real daemon: it adds at
least the round trip it is set to, caps bandwidth, changes no token, and closes a connection's
other side when one side ends. Lower bounds only: nothing asserts that anything is fast."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from splitlm.shared import prepare
from splitlm.shared.client import TrunkClient
from splitlm.shared.errors import UsageError
from splitlm.shared.failover import NO_FAILOVER
from splitlm.shared.generation import GenerationResult, GenerationSettings, generate
from splitlm.shared.paths import unix_path
from splitlm.shared.relay import Relay
from tests.integration.test_split import _source
from tests.shared.test_engine import PROMPT, _NoText

HIDDEN = 64  # tests/conftest.py tiny_config


def _generate(address: str, model_dir: Path, prompt: list[int], n: int) -> GenerationResult:
    client = TrunkClient(address)
    try:
        model = prepare.LoadedModel(*_source(model_dir))
        parts = prepare.split_parts(model, client.info(), torch.device("cpu"))
        pipe = prepare.split_pipeline(parts, client, retry=NO_FAILOVER)
        try:
            return generate(pipe, _NoText(), list(prompt), GenerationSettings(max_new_tokens=n), [])
        finally:
            pipe.close()
    finally:
        client.close()


def _wait_for(predicate: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    """Poll until ``predicate`` holds (a wait for an event, not a timing assertion)."""
    end = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.02)


def _raw_connect(address: str) -> socket.socket:
    path = unix_path(address)
    if path is not None:
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(path))
        return s
    host, port = address.rsplit(":", 1)
    return socket.create_connection((host, int(port)))


@pytest.mark.parametrize("tcp_daemon", [False, True], ids=["unix-daemon-tcp-relay", "tcp-daemon-unix-relay"])
def test_a_step_through_the_relay_pays_the_rtt_and_keeps_the_tokens(  # type: ignore[no-untyped-def]
    tiny_models, daemon_factory, tcp_daemon: bool
) -> None:
    d = daemon_factory(tiny_models["llama"], "--split", "2:4", tcp=tcp_daemon)
    direct = _generate(d.address, tiny_models["llama"], PROMPT, 8)
    rtt = 0.04
    with Relay(d.address, rtt_s=rtt, listen="unix" if tcp_daemon else "tcp") as relay:
        assert relay.address.startswith("unix:" if tcp_daemon else "127.0.0.1:")
        slow = _generate(relay.address, tiny_models["llama"], PROMPT, 8)
        assert relay.stats.connections >= 1 and relay.stats.bytes_up > 0 and relay.stats.bytes_down > 0
    assert slow.token_ids == direct.token_ids
    # every step (the prefill's and each decode step's) crossed the link there and back
    assert slow.ttft_s >= rtt
    assert len(slow.per_token_s) == 7 and min(slow.per_token_s) >= rtt, slow.per_token_s
    assert slow.steps == direct.steps == 8  # one round trip per token: no draft


def test_a_bandwidth_cap_slows_a_big_prefill(tiny_models, daemon_factory) -> None:  # type: ignore[no-untyped-def]
    d = daemon_factory(tiny_models["llama"], "--split", "2:4")
    prompt = (PROMPT * 10)[:200]
    bandwidth = 200_000  # bytes/s each way
    with Relay(d.address, bandwidth=bandwidth) as relay:
        res = _generate(relay.address, tiny_models["llama"], prompt, 2)
    # the prefill sends 200 hidden states of 64 float32 and gets as many back; the reply cannot
    # start before the request has crossed, so the two crossings add up
    payload = len(prompt) * HIDDEN * 4
    assert res.ttft_s >= 2 * payload / bandwidth, res.ttft_s
    assert relay.stats.bytes_up >= payload and relay.stats.bytes_down >= payload


def test_the_client_closing_closes_the_daemon_side(tiny_models, daemon_factory) -> None:  # type: ignore[no-untyped-def]
    d = daemon_factory(tiny_models["llama"], "--split", "2:4")
    watcher = TrunkClient(d.address)
    try:
        with Relay(d.address, rtt_s=0.01) as relay:
            client = TrunkClient(relay.address)
            model = prepare.LoadedModel(*_source(tiny_models["llama"]))
            parts = prepare.split_parts(model, client.info(), torch.device("cpu"))
            pipe = prepare.split_pipeline(parts, client, retry=NO_FAILOVER)
            pipe.step(PROMPT, 0)  # a session is open on the daemon, through the relay
            assert watcher.info().sessions_open == 1 and relay.stats.open_connections == 1
            client.close()  # the channel goes, without closing the session first
            _wait_for(lambda: relay.stats.open_connections == 0, "the relay closed the connection")
            # the daemon saw its side end: the session's cache is freed
            _wait_for(lambda: watcher.info().sessions_open == 0, "the daemon freed the session")
            # the relay still serves new connections
            again = TrunkClient(relay.address)
            assert again.info().plan.trunk_start == 2
            again.close()
    finally:
        watcher.close()
    assert d.proc.poll() is None


def test_the_daemon_ending_closes_the_client_side(tiny_models, daemon_factory) -> None:  # type: ignore[no-untyped-def]
    d = daemon_factory(tiny_models["llama"], "--split", "2:4")
    with Relay(d.address, rtt_s=0.01) as relay:
        s = _raw_connect(relay.address)
        try:
            _wait_for(lambda: relay.stats.open_connections == 1, "the relay accepted")
            d.stop()
            s.settimeout(20)
            # whatever the daemon said on its way out arrives, then the end of the stream
            while s.recv(65536):
                pass
            _wait_for(lambda: relay.stats.open_connections == 0, "the relay closed both sides")
        finally:
            s.close()


def test_a_target_nobody_listens_on_ends_the_connection(tmp_path: Path) -> None:
    with Relay(f"unix:{tmp_path / 'nobody.sock'}", rtt_s=0.01) as relay:
        s = _raw_connect(relay.address)
        s.settimeout(20)
        assert s.recv(10) == b""
        s.close()
    assert relay.address and not Path(str(unix_path(relay.address))).exists()  # its directory is gone


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"rtt_s": -0.001}, "RTT must be >= 0"), ({"bandwidth": 0.5}, "bandwidth must be >= 1"),
     ({"listen": "nowhere"}, "expected unix:/path or host:port")],
)
def test_bad_relay_settings_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        Relay("127.0.0.1:1", **kwargs).start()  # type: ignore[arg-type]


def test_the_relay_command(tiny_models, daemon_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """``splitlm relay`` as a user runs it: the client reaches the daemon through it; SIGTERM
    stops it cleanly with what crossed."""
    import os
    import signal
    import subprocess
    import sys

    from tests.conftest import run_cli

    d = daemon_factory(tiny_models["llama"], "--split", "2:4")
    listen = f"unix:{tmp_path / 'relay.sock'}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "splitlm.tui.cli", "relay", "--trunk", d.address, "--listen", listen, "--rtt", "20ms"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()
        assert f"splitlm relay: {listen} -> {d.address}, RTT 20 ms, no bandwidth cap" in first, first
        r = run_cli("info", "--trunk", listen, "--json")
        assert r.returncode == 0, r.stderr
        assert '"trunk_start": 2' in r.stdout
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        assert proc.wait(30) == 0, rest
        m = re.search(r"(\d+) connection\(s\), (\d+) bytes up, (\d+) bytes down", rest)
        assert m and all(int(x) > 0 for x in m.groups()), rest
        assert "Traceback" not in rest
    finally:
        if proc.poll() is None:
            proc.kill()
    # a bad address: exit 2 with the reason
    bad = run_cli("relay", "--trunk", d.address, "--listen", "nowhere")
    assert bad.returncode == 2 and "expected unix:/path or host:port" in bad.stderr, bad.stderr
