"""``StepBatcher`` on a real trunk part and a real compute thread, without gRPC: steps submitted
together run as one batch, each gets its own output, and a bad step fails alone."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from splitlm.daemon.batcher import BatchPolicy, StepBatcher
from splitlm.daemon.metrics import QueueGauge
from splitlm.shared.errors import ContextExhausted, InvalidStep, PositionError
from splitlm.shared.models import Part, PartSpec, build_part, family_for, resolve


@pytest.fixture(scope="module")
def trunk(tiny_models) -> Part:  # type: ignore[no-untyped-def]
    src = resolve(str(tiny_models["gemma2"]))
    return build_part(src, family_for(src.config), PartSpec.trunk(1, 5), torch.float32, torch.device("cpu"))


def _prefilled(trunk: Part, n: int, seed: int):  # type: ignore[no-untyped-def]
    cache = trunk.new_cache()
    g = torch.Generator().manual_seed(seed)
    trunk.forward(torch.randn(1, n, trunk.hidden_size, generator=g), 0, cache)
    return cache


def test_steps_waiting_together_run_as_one_batch_and_a_bad_one_fails_alone(trunk: Part) -> None:
    lengths = [3, 11, 7, 5]
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(1, 1, trunk.hidden_size, generator=g) for _ in lengths]
    solo_caches = [_prefilled(trunk, n, i) for i, n in enumerate(lengths)]
    want = [trunk.forward(x, n, c) for x, n, c in zip(xs, lengths, solo_caches)]

    caches = [_prefilled(trunk, n, i) for i, n in enumerate(lengths)]
    gap = _prefilled(trunk, 4, 9)
    long = _prefilled(trunk, 4, 10)
    queue = QueueGauge()
    with ThreadPoolExecutor(max_workers=1) as executor:
        batcher = StepBatcher(trunk, executor, BatchPolicy(), queue)

        async def main():  # type: ignore[no-untyped-def]
            good = [batcher.submit(c, x, n, None, lambda t: t) for c, x, n in zip(caches, xs, lengths)]
            bad = [
                batcher.submit(gap, xs[0], 6, None, lambda t: t),  # leaves a gap
                batcher.submit(long, xs[0], 4, 4, lambda t: t),  # past its context cap
                batcher.submit(long, torch.zeros(1, 1, 3), 4, None, lambda t: t),  # wrong width
            ]
            return await asyncio.gather(*good, *bad, return_exceptions=True)

        out = asyncio.run(main())
    got, errors = out[:4], out[4:]
    assert [type(e) for e in errors] == [PositionError, ContextExhausted, InvalidStep]
    for (h, ns), w in zip(got, want):
        torch.testing.assert_close(h, w, rtol=1e-5, atol=1e-5)
        assert ns > 0
    assert [c.length for c in caches] == [n + 1 for n in lengths]
    assert gap.length == long.length == 4  # the bad steps changed nothing
    assert batcher.stats.batches == 1 and batcher.stats.rows == 4
    assert len(queue) == 0


def test_a_lone_step_and_a_prefill_run_alone(trunk: Part) -> None:
    cache = trunk.new_cache()
    with ThreadPoolExecutor(max_workers=1) as executor:
        batcher = StepBatcher(trunk, executor, BatchPolicy(window_s=0.001), QueueGauge())

        async def main():  # type: ignore[no-untyped-def]
            h, _ = await batcher.submit(cache, torch.randn(1, 5, trunk.hidden_size), 0, None, lambda t: t)
            one, _ = await batcher.submit(cache, torch.randn(1, 1, trunk.hidden_size), 5, None, lambda t: t)
            return h, one

        h, one = asyncio.run(main())
    assert h.shape == (1, 5, trunk.hidden_size) and one.shape == (1, 1, trunk.hidden_size)
    assert cache.length == 6
    assert batcher.stats.batches == 0


def test_a_batch_that_fails_midway_is_rolled_back_and_each_step_runs_alone(
    trunk: Part, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection: the last layer's MLP raises on a batch, after every layer's attention has
    appended its rows to the caches. Each cache is rolled back to its position and each step runs
    alone, so every session gets exactly its solo output."""
    lengths = [3, 11, 7]
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(1, 1, trunk.hidden_size, generator=g) for _ in lengths]
    want = [trunk.forward(x, n, _prefilled(trunk, n, i)) for i, (x, n) in enumerate(zip(xs, lengths))]
    caches = [_prefilled(trunk, n, i) for i, n in enumerate(lengths)]
    last = trunk.spec.end - 1
    mlp = trunk.model.model.layers[last].mlp
    real = mlp.forward
    seen: list[list[int]] = []

    def fail_on_a_batch(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 1:
            seen.append([c.layers[last].keys.shape[-2] for c in caches])
            raise RuntimeError("injected in the batch")
        return real(x)  # type: ignore[no-any-return]

    monkeypatch.setattr(mlp, "forward", fail_on_a_batch)
    with ThreadPoolExecutor(max_workers=1) as executor:
        batcher = StepBatcher(trunk, executor, BatchPolicy(), QueueGauge())

        async def main():  # type: ignore[no-untyped-def]
            return await asyncio.gather(
                *[batcher.submit(c, x, n, None, lambda t: t) for c, x, n in zip(caches, xs, lengths)]
            )

        got = asyncio.run(main())
    assert seen == [[n + 1 for n in lengths]]  # the batch had appended its rows, then failed
    for (h, _), w in zip(got, want):
        assert torch.equal(h, w)  # each step alone after the rollback: bit for bit the solo step
    assert [c.length for c in caches] == [n + 1 for n in lengths]
    assert [c.layers[last].keys.shape[-2] for c in caches] == [n + 1 for n in lengths]
    assert batcher.stats.batches == 0  # a failed batch is not counted


@pytest.mark.parametrize("weights", ["float32", "int8", "int4"])
def test_quantised_rows_differ_from_solo_by_rounding_only_like_float32(tiny_models, weights: str) -> None:  # type: ignore[no-untyped-def]
    """Weight-only int8/int4 keep float32 activations: nothing is scaled per batch, so a batched
    row equals its solo step to float rounding, exactly as with float32 weights (the batcher once
    refused int8 parts for the dynamic int8 layers the project no longer uses)."""
    from splitlm.shared.models.precision import precision_named
    from splitlm.shared.models.quantize import quantized_count

    src = resolve(str(tiny_models["llama"]))
    precision = precision_named(weights, torch.device("cpu"))
    part = build_part(src, family_for(src.config), PartSpec.trunk(1, 5), torch.float32, torch.device("cpu"), precision)
    assert (quantized_count(part.model) > 0) == (weights != "float32")
    lengths = [3, 11, 7, 5]
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(1, 1, part.hidden_size, generator=g) for _ in lengths]
    want = [part.forward(x, n, c) for x, n, c in zip(xs, lengths, [_prefilled(part, n, i) for i, n in enumerate(lengths)])]
    caches = [_prefilled(part, n, i) for i, n in enumerate(lengths)]
    with ThreadPoolExecutor(max_workers=1) as executor:
        batcher = StepBatcher(part, executor, BatchPolicy(), QueueGauge())

        async def main():  # type: ignore[no-untyped-def]
            return await asyncio.gather(*[batcher.submit(c, x, n, None, lambda t: t)
                                          for c, x, n in zip(caches, xs, lengths)])

        got = asyncio.run(main())
    assert batcher.stats.batches == 1 and batcher.stats.rows == 4
    for (h, _), w in zip(got, want):
        torch.testing.assert_close(h, w, rtol=1e-5, atol=1e-5)
