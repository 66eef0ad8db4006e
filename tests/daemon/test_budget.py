"""The cache byte budget without a socket: bytes per position match what caches really hold."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch

from splitlm.daemon.budget import CacheBudget, bytes_per_position
from splitlm.daemon.status import SessionRefused
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
    held = b.reserve(0, 6, sessions=1)
    assert (held, b.reserved_bytes) == (6, 600)
    other = b.reserve(0, 4, sessions=2)
    with pytest.raises(SessionRefused) as info:
        b.reserve(other, 5, sessions=2)
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "100 more bytes" in str(info.value) and "1000 of the daemon's 1000 bytes" in str(
        info.value
    )
    assert b.reserved_positions == 10  # a refusal changes nothing
    held = b.reserve(held, 2, sessions=2)  # shrinking always fits
    assert b.reserve(other, 8, sessions=2) == 8
    b.release(held)
    b.release(8)
    assert b.reserved_positions == 0
