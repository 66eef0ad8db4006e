"""Failure table, row 3: 10,000 malformed messages, drawn by hypothesis, straight at the wire:
garbage bytes, wrong shapes, dtypes, sizes, positions, step ids and fields. Every one gets an
error status (never OK, never INTERNAL or UNKNOWN, which would mean a daemon bug), the daemon never
dies, and a normal session works afterwards.

Messages go as raw bytes through a generic ``stream_stream`` with identity serializers, so the
test can send what no generated stub would. A malformed message ends its session (the contract),
so each goes on its own stream, after a valid ``open`` and up to three valid steps where its kind
needs a session; the channel is reused, every call has a deadline.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitlm.protos import trunk_pb2 as pb
from splitlm.protos import trunk_pb2_grpc as pb_grpc
from tests.conftest import Daemon, start_daemon

from .helpers import (
    HIDDEN,
    hidden_tensor,
    open_request,
    plan_of,
    scaled,
    sessions_open,
    step_request,
    wait_until,
)

log = logging.getLogger(__name__)

MAX_CONTEXT = 48
MESSAGES = scaled(10_000, 100_000)
BATCH = 50  # messages drawn per hypothesis example and sent at once, each on its own stream
BAD_CODES = {grpc.StatusCode.OK, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
U32 = st.integers(0, 2**32 - 1)


@dataclass(frozen=True)
class Case:
    """One malformed message and what must come back.

    Attributes:
        kind: what is wrong, for the tally.
        prefix: valid messages before it (``open``, steps), already serialized.
        message: the malformed message, as bytes on the wire.
        codes: the status codes the contract allows for it.
    """

    kind: str
    prefix: tuple[bytes, ...]
    message: bytes
    codes: frozenset[grpc.StatusCode]


@pytest.fixture(scope="module")
def daemon(
    tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("malformed")
    d = start_daemon(
        tiny_models["llama"],
        f"unix:{tmp / 'trunk.sock'}",
        tmp / "trunkd.log",
        "--split",
        "2:4",
        "--max-context",
        str(MAX_CONTEXT),
    )
    yield d
    assert d.stop() == 0, d.log_text()[-3000:]


INVALID = frozenset({grpc.StatusCode.INVALID_ARGUMENT})


@st.composite
def cases(draw: st.DrawFn, plan: pb.Plan) -> Case:
    """A malformed message of one of the kinds below, with the valid prefix it needs."""
    opened = open_request(plan).SerializeToString()
    n_valid = draw(st.integers(0, 3))
    prefix: list[bytes] = [opened]
    cached = 0
    for i in range(n_valid):
        t = draw(st.integers(1, 4))
        prefix.append(step_request(i + 1, cached, hidden_tensor(t, seed=i)).SerializeToString())
        cached += t
    next_id = n_valid + 1
    kind = draw(
        st.sampled_from(
            [
                "garbage-first",
                "garbage-later",
                "step-first",
                "empty-first",
                "empty-later",
                "bad-fingerprint",
                "bad-wire-dtype",
                "second-open",
                "dtype-enum",
                "dtype-mismatch",
                "shape",
                "size",
                "position-gap",
                "past-context",
                "step-id-repeat",
                "step-id-zero",
                "no-hidden",
            ]
        )
    )
    if kind == "garbage-first":
        return Case(
            kind,
            (),
            draw(st.binary(min_size=1, max_size=512)),
            INVALID | {grpc.StatusCode.FAILED_PRECONDITION},
        )
    if kind == "garbage-later":
        junk = draw(st.binary(min_size=1, max_size=512))
        try:  # garbage that parses must not parse as a valid step (it then is a "step" case)
            parsed = pb.SessionRequest.FromString(junk)
            if parsed.HasField("step") and parsed.step.step_id >= next_id:
                junk = b"\xff" + junk
        except Exception:  # noqa: BLE001 - not parsing is the point
            pass
        return Case(
            kind,
            tuple(prefix),
            junk,
            INVALID
            | {
                grpc.StatusCode.OUT_OF_RANGE,
                grpc.StatusCode.ALREADY_EXISTS,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            },
        )
    if kind == "step-first":
        return Case(kind, (), step_request(1, 0, hidden_tensor(2)).SerializeToString(), INVALID)
    if kind == "empty-first":
        return Case(kind, (), b"", INVALID)
    if kind == "empty-later":
        return Case(kind, tuple(prefix), b"", INVALID)
    if kind == "bad-fingerprint":
        fp = draw(st.text(max_size=70).filter(lambda s: s != plan.fingerprint))
        msg = open_request(plan, fingerprint=fp, trunk_start=draw(U32), trunk_end=draw(U32))
        return Case(
            kind, (), msg.SerializeToString(), frozenset({grpc.StatusCode.FAILED_PRECONDITION})
        )
    if kind == "bad-wire-dtype":
        msg = open_request(plan, wire_dtype=draw(st.integers(4, 2**31 - 1)))
        return Case(kind, (), msg.SerializeToString(), INVALID)
    if kind == "second-open":
        return Case(kind, tuple(prefix), opened, INVALID)
    t = draw(st.integers(1, 4))
    tensor = hidden_tensor(t, seed=99)
    step = pb.Step(step_id=next_id, position=cached, hidden=tensor)
    codes = INVALID
    if kind == "dtype-enum":
        step.hidden.dtype = draw(st.one_of(st.just(0), st.integers(4, 2**31 - 1)))
    elif kind == "dtype-mismatch":  # the session's wire dtype is float32
        step.hidden.dtype = draw(st.sampled_from([pb.FLOAT16, pb.BFLOAT16]))
        step.hidden.data = step.hidden.data[: t * HIDDEN * 2]
    elif kind == "shape":
        dims = st.one_of(st.sampled_from([0, 1, t, HIDDEN, 2**31, 2**32 - 1]), U32)
        shape = draw(st.lists(dims, max_size=5).filter(lambda s: s != [1, t, HIDDEN]))
        step.hidden.shape[:] = shape
        if draw(st.booleans()):  # a byte length that matches the wrong shape, when small enough
            n = 1
            for s in shape:
                n *= s
            if n * 4 <= 4096:
                step.hidden.data = bytes(n * 4)
    elif kind == "size":
        cut = draw(st.integers(-len(tensor.data), 64).filter(lambda k: k != 0))
        step.hidden.data = tensor.data[:cut] if cut < 0 else tensor.data + bytes(cut)
    elif kind == "position-gap":
        step.position = draw(st.integers(cached + 1, 2**32 - 1))
        codes = frozenset({grpc.StatusCode.OUT_OF_RANGE})
    elif kind == "past-context":
        step.position = cached
        step.hidden.CopyFrom(hidden_tensor(MAX_CONTEXT - cached + draw(st.integers(1, 8)), seed=7))
        codes = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED})
    elif kind == "step-id-repeat":
        if n_valid == 0:
            step.step_id = 0
        else:
            step.step_id = draw(st.integers(1, n_valid))
            codes = frozenset({grpc.StatusCode.ALREADY_EXISTS})
    elif kind == "step-id-zero":
        step.step_id = 0
    elif kind == "no-hidden":
        step.ClearField("hidden")
    return Case(kind, tuple(prefix), pb.SessionRequest(step=step).SerializeToString(), codes)


class AioSender:
    """An event loop in a thread with one ``grpc.aio`` channel: hypothesis's (synchronous) test
    body hands it a batch of cases, which go out concurrently, one stream each."""

    def __init__(self, address: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.channel = self._run(self._open(address))

    async def _open(self, address: str) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(address)

    def _run(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=120)

    async def _one(self, case: Case) -> grpc.StatusCode:
        session = self.channel.stream_stream(
            "/splitlm.v1.Trunk/Session", request_serializer=None, response_deserializer=None
        )
        call = session(iter([*case.prefix, case.message]), timeout=30)
        try:
            async for _ in call:
                pass
        except grpc.RpcError:
            pass
        return await call.code()

    async def _batch(self, batch: list[Case]) -> list[grpc.StatusCode]:
        return list(await asyncio.gather(*(self._one(c) for c in batch)))

    def send(self, batch: list[Case]) -> list[grpc.StatusCode]:
        return self._run(self._batch(batch))  # type: ignore[no-any-return]

    def close(self) -> None:
        self._run(self.channel.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def test_malformed_messages_get_an_error_status_and_the_daemon_lives(daemon: Daemon) -> None:
    p = plan_of(daemon.address)
    tally: Counter[str] = Counter()
    codes: Counter[str] = Counter()
    wrong: list[str] = []
    t0 = time.monotonic()
    sender = AioSender(daemon.address)
    try:

        @settings(
            max_examples=MESSAGES // BATCH,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(batch=st.lists(cases(p), min_size=BATCH, max_size=BATCH))
        def send(batch: list[Case]) -> None:
            for case, code in zip(batch, sender.send(batch)):
                tally[case.kind] += 1
                codes[code.name] += 1
                if code in BAD_CODES or code not in case.codes:
                    wrong.append(f"{case.kind}: {code.name} for {case.message[:80]!r}")
            assert daemon.proc.poll() is None, "the daemon died"

        send()
    finally:
        sender.close()
    took = time.monotonic() - t0
    log.info(
        "%d malformed messages in %.1f s; kinds %s; codes %s",
        sum(tally.values()),
        took,
        dict(tally),
        dict(codes),
    )
    assert not wrong, f"{len(wrong)} wrong statuses, e.g. {wrong[:5]}"
    assert sum(tally.values()) >= MESSAGES
    assert daemon.proc.poll() is None
    wait_until(lambda: sessions_open(daemon.address) == 0, what="sessions back to 0")
    # a normal session still works
    with grpc.insecure_channel(daemon.address) as channel:
        replies = list(
            pb_grpc.TrunkStub(channel).Session(
                iter(
                    [
                        open_request(p),
                        step_request(1, 0, hidden_tensor(5)),
                        step_request(2, 5, hidden_tensor(1)),
                    ]
                ),
                timeout=30,
            )
        )
    assert [r.result.cached_length for r in replies[1:]] == [5, 6]
    assert "Traceback" not in daemon.log_text()
