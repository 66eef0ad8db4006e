"""``--max-cache-bytes`` caps the memory the cache buffers really hold, not positions in use.

An in-process ``TrunkService`` behind a real ``grpc.aio`` server on loopback, driven by raw
``Session`` streams: after every reply the test adds up ``untyped_storage().nbytes()`` of every
cache buffer of every open session and checks it never passes the cap, with many short sessions
and with a few long ones. Before the budget counted allocated bytes, one 5-token session held 256
positions per layer (the old minimum allocation), four times this cap.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch

from splitlm.daemon.budget import bytes_per_position
from splitlm.daemon.handlers import add_trunk_service
from splitlm.daemon.service import Limits, TrunkService
from splitlm.daemon.steps import TrunkSteps
from splitlm.protos import trunk_pb2 as pb
from splitlm.protos import trunk_pb2_grpc as pb_grpc
from splitlm.shared import codec
from splitlm.shared.cache import PartCache
from splitlm.shared.models import PartSpec, build_part, family_for, resolve
from splitlm.shared.plan import Fingerprint

START, END = 1, 5
log = logging.getLogger(__name__)


@dataclass
class Daemon:
    service: TrunkService
    stub: pb_grpc.TrunkStub
    hidden_size: int
    per_position: int

    def storage_bytes(self) -> int:
        """What the cache buffers of all open sessions hold, counted from the tensors themselves."""
        seen: dict[int, int] = {}
        for s in self.service.sessions._sessions.values():
            seen.update(buffers(s.cache))
        return sum(seen.values())


def buffers(cache: PartCache) -> dict[int, int]:
    """Storage address -> bytes of every key and value buffer of ``cache``."""
    out = {}
    for layer in cache.layers[cache.start : cache.end]:
        for buf in (layer._kbuf, layer._vbuf):  # type: ignore[attr-defined]
            if buf is not None:
                st = buf.untyped_storage()
                out[st.data_ptr()] = st.nbytes()
    return out


async def start(model: Path, max_cache_bytes: int) -> tuple[grpc.aio.Server, grpc.aio.Channel, Daemon]:
    src = resolve(str(model))
    part = build_part(src, family_for(src.config), PartSpec.trunk(START, END), torch.float32, torch.device("cpu"))
    fp = Fingerprint(src.config_digest(), src.weights_digest(), START, END, "float32")
    limits = Limits(max_sessions=64, max_context=256, max_message_bytes=2**24, max_cache_bytes=max_cache_bytes)
    service = TrunkService(TrunkSteps(part, fp, limits, ThreadPoolExecutor(1)))
    server = grpc.aio.server()
    add_trunk_service(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    d = Daemon(service, pb_grpc.TrunkStub(channel), part.hidden_size, bytes_per_position(part))
    return server, channel, d


@pytest.fixture
async def llama_daemon(tiny_models: dict[str, Path], request: pytest.FixtureRequest) -> AsyncIterator[Daemon]:
    server, channel, d = await start(tiny_models["llama"], request.param)
    try:
        yield d
    finally:
        await channel.close()
        await server.stop(0)
        d.service.steps.executor.shutdown()


class Stream:
    """One raw session: open, then steps with increasing ids."""

    def __init__(self, d: Daemon) -> None:
        self.d = d
        self.call = d.stub.Session()
        self.ids = 0
        self.length = 0

    async def open(self, refusals_in_stream: bool = False) -> None:
        p = self.d.service.plan
        fp = self.d.service.fingerprint
        await self.call.write(pb.SessionRequest(open=pb.OpenSession(
            fingerprint=p.fingerprint, config_digest=fp.config_digest, weights_digest=fp.weights_digest,
            trunk_start=p.trunk_start, trunk_end=p.trunk_end, client="test",
            refusals_in_stream=refusals_in_stream,
        )))
        reply = await self.call.read()
        assert reply.HasField("opened")

    async def step(self, t: int, position: int | None = None) -> pb.StepResult:
        self.ids += 1
        position = self.length if position is None else position
        h = torch.randn(1, t, self.d.hidden_size)  # (1, t, H)
        req = pb.SessionRequest()
        req.step.step_id = self.ids
        req.step.position = position
        codec.encode(h, torch.float32, out=req.step.hidden)
        await self.call.write(req)
        reply = await self.call.read()
        if reply is grpc.aio.EOF:
            await self.call  # raises the status
        if reply.HasField("refused"):
            return reply.refused  # type: ignore[no-any-return]
        self.length = position + t
        return reply.result  # type: ignore[no-any-return]


CAP = 64 * 1024
"""64 KiB: 64 positions of the tiny Llama's 4 trunk layers (2 KV heads of 16, float32: 1 KiB)."""


@pytest.mark.parametrize("llama_daemon", [CAP], indirect=True)
async def test_many_short_sessions_hold_at_most_the_cap(llama_daemon: Daemon) -> None:
    d = llama_daemon
    assert d.per_position == 1024
    streams: list[Stream] = []
    refused = 0
    for _ in range(16):
        s = Stream(d)
        await s.open()
        try:
            await s.step(5)
            for _ in range(3):
                await s.step(1)
                assert d.storage_bytes() <= CAP
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-cache-bytes" in (e.details() or "")
            refused += 1
        streams.append(s)
        assert d.storage_bytes() <= CAP
        assert d.service.budget.reserved_bytes == d.storage_bytes()  # the budget is the truth
    served = 16 - refused
    log.info("cap %d B: %d short sessions served, %d refused, buffers %d B, positions in use %d B",
             CAP, served, refused, d.storage_bytes(), d.service.sessions.cache_used_bytes())
    # each session uses 8 positions and holds 13 (5 exact, then +8 slack); the last one squeezes
    assert served >= 4 and refused >= 1, (served, refused)
    info = await d.stub.Info(pb.InfoRequest())
    assert info.limits.max_cache_bytes == CAP
    assert info.cache_allocated_bytes == d.storage_bytes() and 0 < info.cache_used_bytes <= CAP
    # the sessions still open go on: shorten one, the others are unaffected
    alive = [s for s in streams if not s.call.done()]
    await alive[0].step(1, position=2)
    assert d.storage_bytes() <= CAP
    for s in streams:
        s.call.cancel()


@pytest.mark.parametrize("llama_daemon", [4 * CAP], indirect=True)
async def test_a_few_long_sessions_hold_at_most_the_cap(llama_daemon: Daemon) -> None:
    """Two sessions decode until the budget refuses one: storage never passes the cap, and since
    growth shrinks to what fits, a step is refused only when its own position no longer fits."""
    d = llama_daemon
    a, b = Stream(d), Stream(d)
    for s in (a, b):
        await s.open()
        await s.step(20)
    refusal = None
    for _ in range(200):
        try:
            for s in (a, b):
                await s.step(1)
                assert d.storage_bytes() <= 4 * CAP
        except grpc.aio.AioRpcError as e:
            refusal = e
            break
    assert refusal is not None and refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # the refused session's stream ended (its cache is freed); its message says what was held
    held = re.search(r"but (\d+) of the daemon's (\d+) bytes", refusal.details() or "")
    assert held is not None and int(held.group(2)) == 4 * CAP
    assert int(held.group(1)) > 4 * CAP - d.per_position, "refused while a position still fitted"
    assert "needs 1024 more bytes" in (refusal.details() or "")
    survivor = a if not a.call.done() else b
    before = d.storage_bytes()
    result = await survivor.step(1, position=survivor.length - 1)  # a rollback needs no new bytes
    assert result.cached_length == survivor.length and d.storage_bytes() == before
    for s in (a, b):
        s.call.cancel()


@pytest.mark.parametrize("llama_daemon", [CAP], indirect=True)
async def test_a_refused_step_leaves_the_session_as_it_was(llama_daemon: Daemon) -> None:
    """With ``refusals_in_stream`` a step the budget refuses is answered ``StepRefused``: nothing
    allocated, nothing truncated, and the same stream goes on with a step that fits."""
    d = llama_daemon
    s = Stream(d)
    await s.open(refusals_in_stream=True)
    await s.step(50)
    before, length = d.storage_bytes(), s.length
    refused = await s.step(30, position=40)  # a rollback to 40, then 70 positions: 6 KiB too many
    assert isinstance(refused, pb.StepRefused) and refused.step_id == s.ids
    assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and "--max-cache-bytes" in refused.message
    assert d.storage_bytes() == before and s.length == length
    (session,) = d.service.sessions._sessions.values()
    assert session.cache.length == 50  # not even rolled back
    result = await s.step(10, position=20)  # fits in what the session holds
    assert isinstance(result, pb.StepResult) and result.cached_length == 30
    too_long = await s.step(230, position=30)  # past --max-context (256): refused, session kept
    assert isinstance(too_long, pb.StepRefused) and "context limit of 256" in too_long.message
    assert (await s.step(1)).cached_length == 31
    s.call.cancel()
