"""Long steps in slices of layers (``daemon.schedule``): bit for bit what the whole step computes,
and other sessions' steps run between the slices."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from splitlm.daemon.batcher import BatchPolicy
from splitlm.daemon.metrics import QueueGauge
from splitlm.daemon.schedule import DEFAULT_PREFILL_SLICE, SlicedStep, layers_per_slice, run_sliced
from splitlm.daemon.steps import Limits, TrunkSteps
from splitlm.shared import codec
from splitlm.shared.config import DaemonSettings
from splitlm.shared.models import PartSpec, build_part, family_for, resolve
from splitlm.shared.plan import Fingerprint


def test_layers_per_slice() -> None:
    assert layers_per_slice(1024, 28, 4096) == 4
    assert layers_per_slice(16, 28, 4096) == 28  # a short prompt runs whole
    assert layers_per_slice(9000, 28, 4096) == 1  # never less than one layer
    assert layers_per_slice(1024, 28, 0) == 28  # 0: slicing off


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gemma3"])  # rotary; learned positions; sliding layers
def test_a_sliced_step_is_bit_identical_to_the_whole_step(tiny_models: dict[str, Path], kind: str) -> None:
    src = resolve(str(tiny_models[kind]))
    part = build_part(src, family_for(src.config), PartSpec.trunk(1, 5), torch.float32, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    whole, sliced = part.new_cache(), part.new_cache()
    # a prefill, a decode step and a second prefill past the sliding window, over one cache each
    for position, t in ((0, 9), (9, 1), (10, 7)):
        h = torch.randn(1, t, 64, generator=gen)  # (1, t, H)
        expected = part.forward(h, position, whole)
        step = SlicedStep(part, h, position, sliced, None, per_slice=1)
        outs = [step.advance() for _ in range(step.slices)]
        assert outs[:-1] == [None] * (step.slices - 1) and step.slices == 4
        got = outs[-1]
        assert got is not None and torch.equal(got, expected)
        assert (sliced.start, sliced.end, sliced.length) == (1, 5, position + t)
    for a, b in zip(whole.layers[1:5], sliced.layers[1:5]):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


@pytest.mark.parametrize("batching", [None, BatchPolicy()])
async def test_decode_steps_run_between_the_slices_of_a_long_prefill(
    tiny_models: dict[str, Path], batching: BatchPolicy | None
) -> None:
    """One session prefills 4 layers in 4 slices; three other sessions' decode steps, queued while
    the first slice runs, complete before the prefill does (each session's one step is queued at
    once, so no round trip of the test's own decides the order); all outputs stay exact."""
    src = resolve(str(tiny_models["llama"]))
    part = build_part(src, family_for(src.config), PartSpec.trunk(1, 5), torch.float32, torch.device("cpu"))
    fp = Fingerprint(src.config_digest(), src.weights_digest(), 1, 5, "float32")
    limits = Limits(max_sessions=4, max_context=256, max_message_bytes=2**24)
    steps = TrunkSteps(part, fp, limits, ThreadPoolExecutor(1), batching, prefill_slice=200)  # 200 positions: 1 layer
    long_h = torch.randn(1, 200, 64, generator=torch.Generator().manual_seed(1))  # (1, 200, H)
    short_h = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(2))  # (1, 1, H)
    order: list[str] = []
    async with (
        steps.open(torch.float32, "long") as a,
        steps.open(torch.float32, "s1") as b1,
        steps.open(torch.float32, "s2") as b2,
        steps.open(torch.float32, "s3") as b3,
    ):
        async def prefill() -> torch.Tensor:
            out: list[torch.Tensor] = []
            await steps.step(a, 1, 0, codec.encode(long_h, torch.float32), out.append)
            order.append("prefill")
            return out[0]

        async def decode(s: object) -> torch.Tensor:
            out: list[torch.Tensor] = []
            await steps.step(s, 1, 0, codec.encode(short_h, torch.float32), out.append)  # type: ignore[arg-type]
            order.append("decode")
            return out[0]

        long_task = asyncio.create_task(prefill())
        await asyncio.sleep(0)  # the prefill's first slice is queued first
        got_long, *got_short = await asyncio.gather(long_task, decode(b1), decode(b2), decode(b3))
    assert order.index("prefill") >= 2, order  # decode steps completed while the prefill ran
    ref = part.new_cache()
    assert torch.equal(got_long, part.forward(long_h, 0, ref))
    want = part.forward(short_h, 0, part.new_cache())
    for out in got_short:  # batched rows equal solo ones to float rounding, not bit for bit
        assert torch.equal(out, want) if batching is None else torch.allclose(out, want, atol=1e-5)


async def test_a_prefill_alone_runs_in_one_executor_job(tiny_models: dict[str, Path]) -> None:
    """With no other step waiting, the slices never leave the compute thread (no hand-off)."""
    src = resolve(str(tiny_models["llama"]))
    part = build_part(src, family_for(src.config), PartSpec.trunk(1, 5), torch.float32, torch.device("cpu"))
    jobs: list[object] = []

    class Counting(ThreadPoolExecutor):
        def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def]
            jobs.append(fn)
            return super().submit(fn, *args, **kwargs)

    h = torch.randn(1, 50, 64, generator=torch.Generator().manual_seed(4))  # (1, 50, H)
    step = SlicedStep(part, h, 0, part.new_cache(), None, per_slice=1)
    got, _ = await run_sliced(Counting(1), QueueGauge(), step, lambda out: out)
    assert len(jobs) == 1 and step.slices == 4
    assert torch.equal(got, part.forward(h, 0, part.new_cache()))


def test_the_registry_default_is_the_schedule_default() -> None:
    assert DaemonSettings.__dataclass_fields__["prefill_slice"].default == DEFAULT_PREFILL_SLICE
