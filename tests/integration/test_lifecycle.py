"""Limits and lifecycle against a real daemon: the cache byte budget, idle expiry, SIGTERM.

The tiny Llama's trunk 2:4 caches 512 bytes per position (2 layers x keys and values x 2 KV
heads x 16 x float32), so budgets here are counted in positions.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import torch

from splitlm.shared.client import TrunkClient, TrunkStream
from splitlm.shared.errors import DaemonUnreachable, StepRefused, TrunkError
from splitlm.shared.plan import Fingerprint
from tests.conftest import Daemon

BYTES_PER_POSITION = 2 * 2 * 2 * 16 * 4


def wait_until(
    predicate: Callable[[], object], timeout: float = 30.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def open_session(client: TrunkClient) -> TrunkStream:
    p = client.info().plan
    s = client.open_session(
        Fingerprint(p.config_digest, p.weights_digest, p.trunk_start, p.trunk_end), torch.float32
    )
    assert isinstance(s, TrunkStream)
    return s


def step(s: TrunkStream, position: int, t: int, width: int = 64) -> int:
    out, _ = s.step(torch.randn(1, t, width), position)
    return int(out.shape[1])


def test_cache_budget_is_shared_and_checked_before_allocating(
    tiny_models: dict[str, Path], daemon_factory
) -> None:  # type: ignore[no-untyped-def]
    d: Daemon = daemon_factory(
        tiny_models["llama"], "--split", "2:4", "--max-cache-bytes", str(20 * BYTES_PER_POSITION)
    )
    assert f"{20 * BYTES_PER_POSITION} B" not in d.log_text()  # the log speaks GiB and positions
    assert "20 positions at 512 B each" in d.log_text()
    client = TrunkClient(d.address)
    a, b = open_session(client), open_session(client)
    try:
        assert step(a, 0, 12) == 12  # a first allocation is exact: 12 positions of buffers
        assert step(b, 0, 8) == 8  # 20 positions: the budget is full
        with pytest.raises(StepRefused) as info:
            step(b, 8, 1)
        assert info.value.code == "RESOURCE_EXHAUSTED"
        msg = info.value.details
        assert (
            "--max-cache-bytes" in msg
            and "512 more bytes" in msg
            and f"{20 * BYTES_PER_POSITION} bytes" in msg
        )
        # the refused session is still open and as it was; a rollback never needs more bytes
        assert step(b, 4, 4) == 4
        assert step(a, 4, 2) == 2  # a's buffers keep their 12 positions: a rollback frees nothing
        b.close()
        wait_until(lambda: client.info().sessions_open == 1, what="b's buffers freed")
        c = open_session(client)
        assert step(c, 0, 8) == 8  # 12 + 8 = 20
        e = open_session(client)
        with pytest.raises(StepRefused, match="RESOURCE_EXHAUSTED"):
            step(e, 0, 21)  # more than the whole budget: refused, nothing allocated
        c.close()
        e.close()
        wait_until(
            lambda: client.info().sessions_open == 1, what="closed sessions to free their buffers"
        )
        assert step(a, 6, 14) == 14  # a's buffers grow to 20 positions, exactly what is left
        assert client.info().cache_allocated_bytes == 20 * BYTES_PER_POSITION
    finally:
        a.close()
        b.close()
        client.close()
    assert "Traceback" not in d.log_text()


def test_idle_session_expires_with_a_clear_status(
    tiny_models: dict[str, Path], daemon_factory
) -> None:  # type: ignore[no-untyped-def]
    d: Daemon = daemon_factory(tiny_models["llama"], "--split", "2:4", "--idle-timeout", "500ms")
    client = TrunkClient(d.address)
    try:
        s = open_session(client)
        for i in range(5):  # steps closer together than the timeout keep it alive
            assert step(s, i, 1) == 1
        wait_until(lambda: client.info().sessions_open == 0, 10, "the idle session to be closed")
        with pytest.raises(TrunkError) as info:
            step(s, 5, 1)
        assert info.value.code == "ABORTED"
        assert "--idle-timeout" in info.value.details and "0.5 s" in info.value.details
        assert step(open_session(client), 0, 3) == 3  # the daemon serves on
    finally:
        client.close()
    assert "Traceback" not in d.log_text()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Llama wide enough that a 2048-token prefill takes about a second on one core."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=320,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=4096,
    )
    path = tmp_path_factory.mktemp("slow") / "llama"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def test_sigterm_finishes_the_step_in_flight_then_closes_every_session(
    slow_model: Path, daemon_factory
) -> None:  # type: ignore[no-untyped-def]
    d: Daemon = daemon_factory(slow_model, "--split", "1:3", "--shutdown-grace", "60s")
    sock = Path(d.address.removeprefix("unix:"))
    client = TrunkClient(d.address)
    idle, busy = open_session(client), open_session(client)
    step(idle, 0, 4, 512)
    outcome: dict[str, object] = {}

    def prefill() -> None:
        try:
            outcome["t"] = step(busy, 0, 2048, 512)
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = e

    base = _cpu_seconds(d.proc.pid)
    worker = threading.Thread(target=prefill)
    worker.start()
    wait_until(lambda: _cpu_seconds(d.proc.pid) > base + 0.3, 30, "the prefill to be computing")
    t0 = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    worker.join(60)
    assert outcome == {"t": 2048}, outcome  # the step in flight completed
    for s in (idle, busy):  # then every session got a clear status
        with pytest.raises(DaemonUnreachable, match="daemon shutting down"):
            step(s, 4 if s is idle else 2048, 1, 512)
    assert d.proc.wait(60) == 0
    assert time.monotonic() - t0 < 30, (
        "the daemon waited out the grace period instead of closing sessions"
    )
    assert not sock.exists()
    client.close()
    log = d.log_text()
    assert "stopping: 2 sessions open" in log and "Traceback" not in log


_FROZEN_CLIENT = """
import queue, sys, grpc
from splitlm.protos import trunk_pb2 as pb, trunk_pb2_grpc as pb_grpc
stub = pb_grpc.TrunkStub(grpc.insecure_channel(sys.argv[1]))
p = stub.Info(pb.InfoRequest()).plan
q = queue.SimpleQueue()
q.put(pb.SessionRequest(open=pb.OpenSession(fingerprint=p.fingerprint)))
q.put(pb.SessionRequest(step=pb.Step(step_id=1, position=0, hidden=pb.Tensor(
    dtype=pb.FLOAT32, shape=[1, 2, 64], data=bytes(2 * 64 * 4)))))
replies = stub.Session(iter(q.get, None))
next(replies); next(replies)
print("stepped", flush=True)
sys.stdin.readline()
"""


def test_keepalive_drops_a_frozen_peer(tiny_models: dict[str, Path], daemon_factory) -> None:  # type: ignore[no-untyped-def]
    """A client that stops answering (SIGSTOP: its socket stays open, only pings go unanswered)
    loses its session within a few keepalive intervals; grpc's defaults would keep it for hours."""
    import subprocess
    import sys

    d: Daemon = daemon_factory(tiny_models["llama"], "--split", "2:4", "--keepalive", "1s")
    client = TrunkClient(d.address)
    frozen = subprocess.Popen(
        [sys.executable, "-c", _FROZEN_CLIENT, d.address],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert frozen.stdout is not None and frozen.stdout.readline().strip() == "stepped"
        assert client.info().sessions_open == 1
        frozen.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        wait_until(
            lambda: client.info().sessions_open == 0,
            20,
            "the frozen client's session to be dropped",
        )
        assert time.monotonic() - t0 < 10
        assert step(open_session(client), 0, 2) == 2  # the daemon serves on
    finally:
        frozen.kill()
        frozen.wait()
        client.close()
    assert "Traceback" not in d.log_text()


def test_close_returns_once_the_daemon_ended_the_stream(
    tiny_models: dict[str, Path], daemon_factory
) -> None:  # type: ignore[no-untyped-def]
    """When ``close`` returns, the call is over and ended cleanly (OK, not cancelled). A call
    left for gRPC's threads to finish while the interpreter exits deadlocked the collection
    of its object: ``splitlm generate`` printed its whole reply and never exited."""
    d: Daemon = daemon_factory(tiny_models["llama"], "--split", "2:4")
    client = TrunkClient(d.address)
    try:
        sessions = [open_session(client) for _ in range(3)]
        for s in sessions:
            assert step(s, 0, 3) == 3
        for s in sessions:
            s.close()
            assert s._call.done() and s._call.code() == grpc.StatusCode.OK
        assert client.info().sessions_open == 0
    finally:
        client.close()


def test_an_idle_session_survives_the_clients_keepalive_pings(
    tiny_models: dict[str, Path], daemon_factory, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """A session left idle (a user reading the reply) is pinged by its client; the daemon must
    accept those pings. grpc's default server policy wants 5 min between pings without data
    and answered the third 30 s ping with GOAWAY "too_many_pings", killing the session at ~90 s.
    Scaled down here: the client pings every 1.5 s; a daemon with --keepalive 2s accepts 1 s."""
    from splitlm.shared import client as client_module

    d: Daemon = daemon_factory(tiny_models["llama"], "--split", "2:4", "--keepalive", "2s")
    monkeypatch.setattr(client_module, "KEEPALIVE_MS", 1500)
    client = TrunkClient(d.address)
    try:
        s = open_session(client)
        assert step(s, 0, 3) == 3
        time.sleep(8)  # five pings without data; three too close ones were enough for a GOAWAY
        assert step(s, 3, 1) == 1
        s.close()
    finally:
        client.close()
    assert "too_many_pings" not in d.log_text()
