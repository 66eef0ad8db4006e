"""The cache byte budget without a socket: bytes per position match what caches really hold."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch

from splitlm.daemon.budget import CacheBudget, bytes_per_position
from splitlm.daemon.status import SessionRefused
from splitlm.shared.cache import PartCache
from splitlm.shared.models import PartSpec, build_part, family_for, resolve
from tests.conftest import FAMILY_KINDS


@pytest.mark.parametrize("kind", FAMILY_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bytes_per_position_is_what_the_cache_holds(
    tiny_models: dict[str, Path], kind: str, dtype: torch.dtype
) -> None:
    src = resolve(str(tiny_models[kind]))
    part = build_part(src, family_for(src.config), PartSpec.trunk(1, 5), dtype, torch.device("cpu"))
    cache = part.new_cache()
    part.forward(torch.randn(1, 9, part.hidden_size), 0, cache)  # past the sliding window (6)
    part.forward(torch.randn(1, 3, part.hidden_size), 9, cache)
    assert cache.nbytes() == 12 * bytes_per_position(part)
    part.forward(torch.randn(1, 2, part.hidden_size), 4, cache)  # a rollback shrinks it
    assert cache.nbytes() == 6 * bytes_per_position(part)


def test_budget_reserves_and_releases() -> None:
    b = CacheBudget(max_bytes=1000, per_position=100)
    held = b.reserve(0, 600, sessions=1)
    assert (held, b.reserved_bytes, b.free) == (600, 600, 400)
    other = b.reserve(0, 400, sessions=2)
    with pytest.raises(SessionRefused) as info:
        b.reserve(other, 500, sessions=2)
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "100 more bytes" in str(info.value) and "1000 of the daemon's 1000 bytes" in str(
        info.value
    )
    assert b.reserved_bytes == 1000  # a refusal changes nothing
    held = b.settle(held, 200)  # the step allocated less than it reserved
    assert b.reserve(other, 800, sessions=2) == 800
    b.release(held)
    b.release(800)
    assert b.reserved_bytes == 0


@pytest.mark.parametrize("kind", ["llama", "gemma2", "gemma3"])
def test_plan_is_what_the_step_allocates(tiny_models: dict[str, Path], kind: str) -> None:
    """``PartCache.plan`` before a step equals the storage the step adds, with and without a
    limit; a limit squeezes the slack but never below the step's own positions."""
    src = resolve(str(tiny_models[kind]))
    part = build_part(src, family_for(src.config), PartSpec.trunk(1, 5), torch.float32, torch.device("cpu"))
    unit = bytes_per_position(part) // 4  # one position of one layer
    g = torch.Generator().manual_seed(0)
    # (position, t): a prefill, decode steps past a sliding layer's kept 5 + 4 positions, a
    # verify, a rollback, a re-prefill from 0 longer than what is kept, more decode steps
    steps = [(0, 9), *((p, 1) for p in range(9, 24)), (24, 4), (25, 2), (0, 17), *((p, 1) for p in range(17, 30))]
    for limit in (None, 12 * unit * 4, 0):
        cache = PartCache(part.config, 1, 5, rollback_depth=4)
        ran = 0
        for position, t in steps:
            if position > cache.length:
                continue  # follows a refused step
            before = cache.allocated_bytes()
            growth = cache.plan(position, t, unit, limit)
            assert growth.needed <= growth.planned
            if limit is not None and growth.needed > limit:
                continue  # the daemon refuses this step; nothing ran
            if limit is not None:
                assert growth.planned <= limit
            part.forward(torch.randn(1, t, part.hidden_size, generator=g), position, cache)
            assert cache.allocated_bytes() - before == growth.planned, (limit, position, t)
            ran += 1
        assert ran == 0 if limit == 0 else ran > 10  # nothing fits in no bytes
