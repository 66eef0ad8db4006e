"""The bad-input table of the core contract, row by row, against a real daemon process.

Every refusal must carry the right gRPC status and a message a person can act on, and the daemon
must keep serving other sessions afterwards (``assert_still_serving``).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import numpy as np
import pytest

from splitlm.protos import trunk_pb2 as pb
from splitlm.protos import trunk_pb2_grpc as pb_grpc
from tests.conftest import Daemon, run_cli, run_trunkd, save_tiny, start_daemon

HIDDEN = 64  # tiny_config's hidden size
MAX_CONTEXT = 24
MAX_SESSIONS = 3


@pytest.fixture(scope="module")
def daemon(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One tiny-Llama daemon for the module, with small limits so that they can be reached."""
    tmp = tmp_path_factory.mktemp("bad-input")
    d = start_daemon(
        tiny_models["llama"], f"unix:{tmp / 'trunk.sock'}", tmp / "trunkd.log", "--split", "2:4",
        "--max-context", str(MAX_CONTEXT), "--max-sessions", str(MAX_SESSIONS),
    )
    yield d
    assert d.stop() == 0, d.log_text()[-3000:]
    assert "Traceback" not in d.log_text(), "a client's mistake reached the daemon as a bug"


@pytest.fixture
def stub(daemon: Daemon) -> Iterator[pb_grpc.TrunkStub]:
    with grpc.insecure_channel(daemon.address) as channel:
        yield pb_grpc.TrunkStub(channel)


def plan(stub: pb_grpc.TrunkStub) -> pb.Plan:
    return stub.Info(pb.InfoRequest(), timeout=10).plan


def open_msg(p: pb.Plan, **override: object) -> pb.SessionRequest:
    fields: dict[str, object] = dict(
        fingerprint=p.fingerprint, config_digest=p.config_digest, weights_digest=p.weights_digest,
        trunk_start=p.trunk_start, trunk_end=p.trunk_end, client="test_bad_input",
    )
    fields.update(override)
    return pb.SessionRequest(open=pb.OpenSession(**fields))  # type: ignore[arg-type]


def hidden(t: int, width: int = HIDDEN, dtype: int = pb.FLOAT32, data: bytes | None = None) -> pb.Tensor:
    if data is None:
        itemsize = 4 if dtype == pb.FLOAT32 else 2
        data = np.random.default_rng(t).standard_normal(t * width).astype(np.float32).tobytes()
        data = data[: t * width * itemsize]
    return pb.Tensor(dtype=dtype, shape=[1, t, width], data=data)


def step_msg(position: int, tensor: pb.Tensor, step_id: int = 1) -> pb.SessionRequest:
    return pb.SessionRequest(step=pb.Step(step_id=step_id, position=position, hidden=tensor))


def exchange(stub: pb_grpc.TrunkStub, requests: Sequence[pb.SessionRequest]) -> list[pb.SessionReply]:
    """Send ``requests`` on one session stream; every reply, or the RpcError that ended it."""
    return list(stub.Session(iter(requests), timeout=30))


def refused(stub: pb_grpc.TrunkStub, requests: Sequence[pb.SessionRequest]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        exchange(stub, requests)
    return info.value


def assert_still_serving(stub: pb_grpc.TrunkStub) -> None:
    """A normal session still opens and steps, and no session was left behind."""
    p = plan(stub)
    replies = exchange(stub, [open_msg(p), step_msg(0, hidden(5)), step_msg(5, hidden(1), 2)])
    assert replies[0].HasField("opened")
    assert [r.result.cached_length for r in replies[1:]] == [5, 6]
    wait_until(lambda: stub.Info(pb.InfoRequest(), timeout=10).sessions_open == 0)


def wait_until(predicate, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


class TestPlans:
    """Row 1: a plan out of range is refused before any weight is loaded, with the valid range."""

    # A == B and B past L are the rule's cases (tests/shared/test_engine.py): one daemon start each is
    # kept for the shapes that reach different code (order, bounds, syntax)
    @pytest.mark.parametrize("split", ["4:2", "0:4", "2:6", "x:y", "2"])
    def test_daemon_refuses_bad_split(self, tiny_models: dict[str, Path], split: str) -> None:
        r = run_trunkd("--model", str(tiny_models["llama"]), "--split", split, "--listen", "unix:/nonexistent/x")
        assert r.returncode == 2, r.stderr
        assert "0 < A < B < 6" in r.stderr
        assert "Traceback" not in r.stderr
        assert "loading" not in r.stderr.lower()


class TestFingerprint:
    """Row 2: a client with another model, other weights or another range gets FAILED_PRECONDITION
    naming what differs."""

    def test_other_weights(self, stub: pb_grpc.TrunkStub, tmp_path: Path) -> None:
        from splitlm.shared.models import resolve
        from splitlm.shared.plan import Fingerprint

        other = resolve(str(save_tiny("llama", tmp_path / "other", seed=1)))
        p = plan(stub)
        theirs = Fingerprint(other.config_digest(), other.weights_digest(), p.trunk_start, p.trunk_end)
        assert theirs.config_digest == p.config_digest  # same architecture, different weights
        e = refused(stub, [open_msg(p, fingerprint=theirs.digest, weights_digest=theirs.weights_digest)])
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "weights" in e.details() and "config" not in e.details().split("This daemon")[0]
        assert_still_serving(stub)

    def test_other_range(self, stub: pb_grpc.TrunkStub) -> None:
        from splitlm.shared.plan import Fingerprint

        p = plan(stub)
        theirs = Fingerprint(p.config_digest, p.weights_digest, 1, 5)
        e = refused(stub, [open_msg(p, fingerprint=theirs.digest, trunk_start=1, trunk_end=5)])
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "trunk range (2:4 here, 1:5 from the client)" in e.details()
        assert_still_serving(stub)

    def test_other_model(self, stub: pb_grpc.TrunkStub, tiny_models: dict[str, Path]) -> None:
        from splitlm.shared.models import resolve
        from splitlm.shared.plan import Fingerprint

        gpt2 = resolve(str(tiny_models["gpt2"]))
        theirs = Fingerprint(gpt2.config_digest(), gpt2.weights_digest(), 2, 4)
        p = plan(stub)
        e = refused(stub, [open_msg(p, fingerprint=theirs.digest, config_digest=theirs.config_digest,
                                    weights_digest=theirs.weights_digest)])
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "model config" in e.details() and "weights" in e.details()
        assert_still_serving(stub)

    def test_cli_with_other_model_is_refused_before_loading(
        self, daemon: Daemon, tiny_models: dict[str, Path]
    ) -> None:
        r = run_cli("generate", "--trunk", daemon.address, "--model", str(tiny_models["gpt2"]), "hi")
        assert r.returncode == 2, r.stderr
        assert "pass the daemon's model with --model" in r.stderr
        assert "Traceback" not in r.stderr


class TestSteps:
    """Rows 3 and 4: malformed steps get INVALID_ARGUMENT / OUT_OF_RANGE."""

    @pytest.mark.parametrize(
        ("tensor", "words"),
        [
            (hidden(3, width=HIDDEN + 1), "hidden"),
            (pb.Tensor(dtype=pb.FLOAT32, shape=[3, HIDDEN], data=bytes(3 * HIDDEN * 4)), "shape"),
            (pb.Tensor(dtype=pb.FLOAT32, shape=[2, 3, HIDDEN], data=bytes(6 * HIDDEN * 4)), "shape"),
            (hidden(3, dtype=pb.BFLOAT16), "bfloat16"),
            (hidden(3, dtype=pb.DTYPE_UNSPECIFIED), "dtype"),
            (pb.Tensor(dtype=pb.FLOAT32, shape=[1, 3, HIDDEN], data=bytes(3 * HIDDEN * 4 - 1)), "bytes"),
            (pb.Tensor(dtype=pb.FLOAT32, shape=[1, 0, HIDDEN], data=b""), "t>0"),
            (pb.Tensor(), "dtype"),
        ],
        ids=["hidden-size", "rank-2", "batch-2", "dtype", "no-dtype", "byte-length", "zero-t", "empty"],
    )
    def test_malformed_hidden_states(self, stub: pb_grpc.TrunkStub, tensor: pb.Tensor, words: str) -> None:
        p = plan(stub)
        e = refused(stub, [open_msg(p), step_msg(0, hidden(4)), step_msg(4, tensor, 2)])
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e.details()
        assert words in e.details()
        assert_still_serving(stub)

    def test_step_without_hidden_states(self, stub: pb_grpc.TrunkStub) -> None:
        p = plan(stub)
        e = refused(stub, [open_msg(p), pb.SessionRequest(step=pb.Step(step_id=1, position=0))])
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert_still_serving(stub)

    def test_step_before_open(self, stub: pb_grpc.TrunkStub) -> None:
        e = refused(stub, [step_msg(0, hidden(2))])
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "first message" in e.details() and "open" in e.details()
        assert_still_serving(stub)

    def test_second_open(self, stub: pb_grpc.TrunkStub) -> None:
        p = plan(stub)
        e = refused(stub, [open_msg(p), open_msg(p)])
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert_still_serving(stub)

    def test_empty_request(self, stub: pb_grpc.TrunkStub) -> None:
        p = plan(stub)
        e = refused(stub, [open_msg(p), pb.SessionRequest()])
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert_still_serving(stub)

    def test_position_gap(self, stub: pb_grpc.TrunkStub) -> None:
        p = plan(stub)
        e = refused(stub, [open_msg(p), step_msg(0, hidden(4)), step_msg(6, hidden(1), 2)])
        assert e.code() == grpc.StatusCode.OUT_OF_RANGE
        assert "gap" in e.details() and "4 positions cached" in e.details()
        assert_still_serving(stub)

    def test_rollback_is_not_an_error(self, stub: pb_grpc.TrunkStub) -> None:
        """A position below the cached length rolls back: the same input gives the same output."""
        p = plan(stub)
        replies = exchange(stub, [open_msg(p), step_msg(0, hidden(6)), step_msg(6, hidden(2), 2),
                                  step_msg(6, hidden(2), 3), step_msg(3, hidden(1), 4)])
        assert [r.result.cached_length for r in replies[1:]] == [6, 8, 8, 4]
        assert replies[2].result.hidden.data == replies[3].result.hidden.data

    def test_unknown_wire_dtype(self, stub: pb_grpc.TrunkStub) -> None:
        p = plan(stub)
        e = refused(stub, [open_msg(p, wire_dtype=77)])
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert_still_serving(stub)


class TestLimits:
    """Row 5: the context and session caps answer RESOURCE_EXHAUSTED; nobody else is affected."""

    def test_context_beyond_max_context(self, stub: pb_grpc.TrunkStub) -> None:
        p = plan(stub)
        e = refused(stub, [open_msg(p), step_msg(0, hidden(MAX_CONTEXT - 1)),
                           step_msg(MAX_CONTEXT - 1, hidden(1), 2), step_msg(MAX_CONTEXT, hidden(1), 3)])
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"context limit of {MAX_CONTEXT}" in e.details()
        e = refused(stub, [open_msg(p), step_msg(0, hidden(MAX_CONTEXT + 1))])
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert_still_serving(stub)

    def test_sessions_beyond_max_sessions(self, daemon: Daemon, stub: pb_grpc.TrunkStub) -> None:
        from splitlm.shared.client import TrunkClient
        from splitlm.shared.errors import TrunkError
        from splitlm.shared.plan import Fingerprint

        p = plan(stub)
        fp = Fingerprint(p.config_digest, p.weights_digest, p.trunk_start, p.trunk_end)
        client = TrunkClient(daemon.address)
        import torch

        held = [client.open_session(fp, torch.float32) for _ in range(MAX_SESSIONS)]
        try:
            for s in held:
                s.step(torch.zeros(1, 3, HIDDEN), 0)
            with pytest.raises(TrunkError) as info:
                client.open_session(fp, torch.float32)
            assert info.value.code == "RESOURCE_EXHAUSTED"
            assert f"limit of {MAX_SESSIONS} sessions" in str(info.value)
            # the sessions already open are unaffected
            out, _ = held[0].step(torch.zeros(1, 1, HIDDEN), 3)
            assert out.shape == (1, 1, HIDDEN)
        finally:
            for s in held:
                s.close()
            client.close()
        assert_still_serving(stub)


class TestTransport:
    """Rows 6 to 8: garbage on the wire, no daemon, a client that vanishes."""

    @pytest.mark.parametrize("payload", [b"\xff\xfe garbage", b"\x0a\xff\xff\xff\xff\x0f", bytes(range(256)) * 4])
    def test_garbage_bytes(self, daemon: Daemon, stub: pb_grpc.TrunkStub, payload: bytes) -> None:
        with grpc.insecure_channel(daemon.address) as channel:
            raw = channel.stream_stream(
                "/splitlm.v1.Trunk/Session", request_serializer=None, response_deserializer=None
            )
            with pytest.raises(grpc.RpcError) as info:
                list(raw(iter([payload]), timeout=10))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a valid splitlm.v1.SessionRequest" in info.value.details()
            unary = channel.unary_unary("/splitlm.v1.Trunk/Info")
            with pytest.raises(grpc.RpcError) as info:
                unary(payload, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert daemon.proc.poll() is None
        assert_still_serving(stub)

    def test_no_daemon(self, tmp_path: Path) -> None:
        address = f"unix:{tmp_path / 'nobody.sock'}"
        r = run_cli("generate", "--trunk", address, "hello", timeout=120)
        assert r.returncode == 1
        assert address in r.stderr
        assert "splitlm-trunkd" in r.stderr and "--full" in r.stderr
        assert "Traceback" not in r.stderr
        r = run_cli("info", "--trunk", address, env={"SPLITLM_TRUNK": ""})
        assert r.returncode == 1 and address in r.stderr and "Traceback" not in r.stderr

    def test_client_vanishes_mid_session(self, daemon: Daemon, stub: pb_grpc.TrunkStub) -> None:
        """A client process killed while its session is open: the daemon frees the cache."""
        code = textwrap.dedent(
            f"""
            import os, sys, grpc
            from splitlm.protos import trunk_pb2 as pb, trunk_pb2_grpc as pb_grpc
            ch = grpc.insecure_channel({daemon.address!r})
            stub = pb_grpc.TrunkStub(ch)
            p = stub.Info(pb.InfoRequest()).plan
            import queue
            q = queue.SimpleQueue()
            q.put(pb.SessionRequest(open=pb.OpenSession(fingerprint=p.fingerprint)))
            q.put(pb.SessionRequest(step=pb.Step(step_id=1, position=0, hidden=pb.Tensor(
                dtype=pb.FLOAT32, shape=[1, 4, {HIDDEN}], data=bytes(4 * {HIDDEN} * 4)))))
            replies = stub.Session(iter(q.get, None))
            next(replies); next(replies)
            print("stepped", flush=True)
            sys.stdin.readline()
            """
        )
        proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True)
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "stepped"
            assert stub.Info(pb.InfoRequest(), timeout=10).sessions_open == 1
            proc.kill()
            proc.wait(10)
            wait_until(lambda: stub.Info(pb.InfoRequest(), timeout=10).sessions_open == 0)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert daemon.proc.poll() is None
        assert_still_serving(stub)
