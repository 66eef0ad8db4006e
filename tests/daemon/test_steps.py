"""The daemon's step logic in-process, without a socket: ``TrunkSteps`` opens sessions, checks
and runs steps, reserves and settles the cache budget; ``TrunkService`` only translates."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch

from splitlm.daemon.status import SessionRefused
from splitlm.daemon.steps import Limits, TrunkSteps
from splitlm.protos import trunk_pb2 as pb
from splitlm.shared import codec
from splitlm.shared.errors import InvalidStep, PositionError
from splitlm.shared.models import PartSpec, build_part, family_for, resolve
from splitlm.shared.plan import Fingerprint


@pytest.fixture
def steps(tiny_models: dict[str, Path]) -> TrunkSteps:
    src = resolve(str(tiny_models["llama"]))
    part = build_part(src, family_for(src.config), PartSpec.trunk(1, 5), torch.float32, torch.device("cpu"))
    fp = Fingerprint(src.config_digest(), src.weights_digest(), 1, 5, "float32")
    limits = Limits(max_sessions=2, max_context=64, max_message_bytes=2**24, max_cache_bytes=40 * 1024)
    return TrunkSteps(part, fp, limits, ThreadPoolExecutor(1))


def hidden(t: int, seed: int) -> tuple[torch.Tensor, pb.Tensor]:
    h = torch.randn(1, t, 64, generator=torch.Generator().manual_seed(seed))  # (1, t, H)
    return h, codec.encode(h, torch.float32)


async def test_steps_run_check_and_budget_without_a_socket(steps: TrunkSteps) -> None:
    part = steps.part
    reference = part.new_cache()
    outs: list[torch.Tensor] = []
    async with steps.open(torch.float32, "test") as s:
        h, msg = hidden(10, 0)
        done = await steps.step(s, 1, 0, msg, outs.append)
        assert torch.equal(outs[-1], part.forward(h, 0, reference))
        assert (done.cached_length, done.rollback_floor) == (10, 0)
        for layer in s.cache.layers[1:5]:
            assert layer.keys.shape == (1, 2, 10, 16)  # (B, kvh, positions, hd)
        # checked once, before anything changes: a replayed id, a wrong dtype, a gap
        with pytest.raises(SessionRefused) as again:
            await steps.step(s, 1, 10, hidden(1, 1)[1], outs.append)
        assert again.value.code == grpc.StatusCode.ALREADY_EXISTS
        with pytest.raises(InvalidStep, match="wire dtype"):
            await steps.step(s, 2, 10, codec.encode(hidden(1, 1)[0], torch.bfloat16), outs.append)
        with pytest.raises(PositionError, match="gap"):
            await steps.step(s, 2, 11, hidden(1, 1)[1], outs.append)
        # the budget: 40 KiB are 40 positions of 4 layers; 10 allocated, 30 more do not fit
        with pytest.raises(SessionRefused) as full:
            await steps.step(s, 3, 10, hidden(31, 2)[1], outs.append)
        assert full.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert s.cache.length == 10 and steps.budget.reserved_bytes == s.cache.allocated_bytes() == 10 * 1024
        # a rollback and a decode step: still what the part computes alone
        h, msg = hidden(3, 3)
        done = await steps.step(s, 4, 7, msg, outs.append)
        assert torch.equal(outs[-1], part.forward(h, 7, reference))
        assert done.cached_length == 10 and s.last_step_id == 4 and s.steps == 2
        assert steps.metrics.totals.steps == 2 and steps.metrics.totals.positions == 13
    assert len(steps.sessions) == 0 and steps.budget.reserved_bytes == 0


async def test_open_checks_the_plan_and_the_session_cap(steps: TrunkSteps) -> None:
    fp = steps.fingerprint
    assert steps.check_open(fp, fp.digest, None) == torch.float32
    other = Fingerprint(fp.config_digest, fp.weights_digest, 2, 5, "float32")
    with pytest.raises(SessionRefused) as info:
        steps.check_open(other, "not-this-one", None)
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION and "layers 1:5" in str(info.value)
    async with steps.open(torch.float32, "a"), steps.open(torch.float32, "b"):
        with pytest.raises(SessionRefused) as cap:
            async with steps.open(torch.float32, "c"):
                pass
        assert cap.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_a_decode_step_runs_on_the_loop_only_when_the_compute_is_idle(steps: TrunkSteps) -> None:
    """A prefill goes to the executor; a one-position step that finds the compute lock free runs
    on the loop's own thread (no hand-off); one that finds it held waits for the executor. The
    outputs are the part's own either way."""
    ran_on: list[str] = []
    outs: list[torch.Tensor] = []

    def keep(out: torch.Tensor) -> None:
        ran_on.append(threading.current_thread().name)
        outs.append(out)

    reference = steps.part.new_cache()
    async with steps.open(torch.float32, "test") as s:
        for step_id, (position, t) in enumerate([(0, 10), (10, 1), (11, 1)], start=1):
            h, msg = hidden(t, step_id)
            if step_id == 3:  # the compute busy (as with a cancelled step still on the executor)
                steps._compute.acquire()
                pending = asyncio.ensure_future(steps.step(s, step_id, position, msg, keep))
                await asyncio.sleep(0)  # the step's task runs up to its wait
                assert not pending.done()  # for the compute, on the executor; the loop runs on
                steps._compute.release()
                await pending
            else:
                await steps.step(s, step_id, position, msg, keep)
            assert torch.equal(outs[-1], steps.part.forward(h, position, reference))
    loop_thread = threading.current_thread().name
    assert ran_on[0] != loop_thread and ran_on[1] == loop_thread and ran_on[2] != loop_thread, ran_on
