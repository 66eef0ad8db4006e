"""The KV cache's preallocated buffers: what each layer returns equals transformers' own layers,
step for step, across growth and rollback; and a decode step does not copy the history."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from splitlm.shared.cache import (
    GROW_MAX_STEP,
    GROW_MIN,
    FullLayer,
    RollbackTooDeep,
    SlidingLayer,
    grown_capacity,
)

KVH, HD = 2, 8


def kv(t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, KVH, t, HD, generator=g), torch.randn(1, KVH, t, HD, generator=g)  # (B, kvh, t, hd)


def test_capacity_doubles_within_bounds() -> None:
    assert grown_capacity(0, 5) == 5  # a first allocation is exact: short sessions hold no slack
    assert grown_capacity(0, 3000) == 3000  # a prefill gets what it needs, no slack
    assert grown_capacity(5, 6) == 5 + GROW_MIN
    assert grown_capacity(GROW_MIN, GROW_MIN + 1) == 2 * GROW_MIN
    assert grown_capacity(100_000, 100_001) == 100_000 + GROW_MAX_STEP
    for cap in (0, 1, 300, 5000):
        for need in (cap + 1, cap + 700, 3 * cap + 9):
            assert grown_capacity(cap, need) >= need


@pytest.mark.parametrize("steps", [[1] * 300, [40, 1, 1, 7, 1, 300, 1, 1], [700, 1, 1]])
def test_full_layer_returns_what_transformers_returns(steps: list[int]) -> None:
    ours, theirs = FullLayer(), DynamicLayer()
    for i, t in enumerate(steps):
        k, v = kv(t, i)
        ok, ov = ours.update(k, v)
        tk, tv = theirs.update(k, v)
        assert torch.equal(ok, tk) and torch.equal(ov, tv)
    assert ours.get_seq_length() == theirs.get_seq_length() == sum(steps)


def test_decode_steps_write_in_place() -> None:
    layer = FullLayer()
    layer.update(*kv(10, 0))
    buffers = set()
    for i in range(500):
        layer.update(*kv(1, i + 1))
        buffers.add(layer.keys.untyped_storage().data_ptr())
    # 510 positions: 10 -> 26 -> 52 -> 104 -> 208 -> 416 -> 832, one buffer per doubling, not per step
    assert len(buffers) <= 7
    assert layer.keys.shape == (1, KVH, 510, HD)


def test_rollback_then_new_positions_overwrite_the_old_ones() -> None:
    layer = FullLayer()
    k0, v0 = kv(20, 0)
    layer.update(k0, v0)
    layer.truncate(12)
    assert layer.get_seq_length() == 12
    k1, v1 = kv(3, 1)
    keys, values = layer.update(k1, v1)
    assert torch.equal(keys, torch.cat([k0[..., :12, :], k1], dim=-2))
    assert torch.equal(values, torch.cat([v0[..., :12, :], v1], dim=-2))


@pytest.mark.parametrize("steps", [[1] * 40, [3, 1, 1, 9, 1, 1, 1], [30, 1, 1], [5, 20, 1]])
def test_sliding_layer_returns_what_transformers_returns(steps: list[int]) -> None:
    window = 6
    ours, theirs = SlidingLayer(sliding_window=window), DynamicSlidingWindowLayer(sliding_window=window)
    for i, t in enumerate(steps):
        k, v = kv(t, i)
        ok, ov = ours.update(k, v)
        tk, tv = theirs.update(k, v)
        assert torch.equal(ok, tk) and torch.equal(ov, tv), f"step {i}"
        assert ours.get_mask_sizes(1) == theirs.get_mask_sizes(1)
    assert ours.keys.shape[-2] == sum(steps)  # all history kept, for rollback


def sliding_steps(n: int, seed: int) -> list[int]:
    """A prefill, then mostly decode steps with a few short chunks (speculative verifies)."""
    g = torch.Generator().manual_seed(seed)
    steps = [20]
    while sum(steps) < n:
        steps.append(int(torch.randint(2, 5, (1,), generator=g)) if len(steps) % 7 == 0 else 1)
    return steps


def test_sliding_layer_memory_is_flat_past_the_window() -> None:
    """Past ``W - 1 + depth`` the layer keeps a bounded number of positions and its buffers stop
    growing, while it still returns what transformers' layer returns, step for step."""
    window, depth = 6, 8
    ours, theirs = SlidingLayer(sliding_window=window, rollback_depth=depth), DynamicSlidingWindowLayer(window)
    allocated = []
    for i, t in enumerate(sliding_steps(400, 0)):
        k, v = kv(t, i)
        ok, ov = ours.update(k, v)
        tk, tv = theirs.update(k, v)
        assert torch.equal(ok, tk) and torch.equal(ov, tv), f"step {i}"
        assert ours.get_mask_sizes(1) == theirs.get_mask_sizes(1)
        assert ours.keys.shape[-2] <= ours._max_capacity()
        allocated.append(ours.allocated_bytes())
    keep = window - 1 + depth
    bound = (keep + max(GROW_MIN, keep // 4)) * KVH * HD * 4 * 2  # float32 keys and values
    assert max(allocated) <= bound
    assert allocated[-1] == allocated[len(allocated) // 4]  # flat, not growing with the context
    assert ours.get_seq_length() >= 400


def test_sliding_layer_prefill_longer_than_what_is_kept() -> None:
    window, depth = 6, 4
    ours, theirs = SlidingLayer(sliding_window=window, rollback_depth=depth), DynamicSlidingWindowLayer(window)
    for i, t in enumerate([50, 1, 1, 30, 1]):
        k, v = kv(t, i)
        ok, ov = ours.update(k, v)
        tk, tv = theirs.update(k, v)
        assert torch.equal(ok, tk) and torch.equal(ov, tv), f"step {i}"
    assert ours.capacity <= 2 * (window - 1 + depth)


def test_sliding_rollback_within_depth_is_exact_and_beyond_is_refused() -> None:
    """A rollback of up to ``depth`` positions continues exactly as a layer that kept everything
    would; a deeper one raises ``RollbackTooDeep`` and changes nothing."""
    window, depth = 6, 10
    bounded = SlidingLayer(sliding_window=window, rollback_depth=depth)
    whole = SlidingLayer(sliding_window=window, rollback_depth=10_000)
    for i, t in enumerate(sliding_steps(200, 1)):
        k, v = kv(t, i)
        bounded.update(k, v)
        whole.update(k, v)
    n = bounded.get_seq_length()
    assert n - depth >= bounded.rollback_floor() > 0
    with pytest.raises(RollbackTooDeep, match="re-prefill from position 0"):
        bounded.truncate(bounded.rollback_floor() - 1)
    assert bounded.get_seq_length() == n  # nothing changed
    for back in (1, 3, depth):
        bounded.truncate(n - back)
        whole.truncate(n - back)
        for j in range(3):
            k, v = kv(1 + j % 2, 1000 + back * 10 + j)
            bk, bv = bounded.update(k, v)
            wk, wv = whole.update(k, v)
            assert torch.equal(bk, wk) and torch.equal(bv, wv), (back, j)
        n = bounded.get_seq_length()
        assert n == whole.get_seq_length()


def test_token_log_rewinds_below_the_floor_and_after_a_refused_step() -> None:
    """The pipeline's step plan: a rollback below the floor re-prefills from 0 with the ids it
    holds; a step after one the trunk refused starts again where the refused one did."""
    from splitlm.shared.generation import TokenLog

    log = TokenLog()
    log.ran(list(range(10, 30)), 0)
    assert log.rewind([7], 20, floor=0) == ([7], 20)
    assert log.rewind([7], 12, floor=15) == ([*range(10, 22), 7], 0)
    assert log.rewind([7], 0, floor=15) == ([7], 0)  # 0 is always reachable
    log.refused(16)  # the bottom ran a step at 16, the trunk refused it
    assert log.rewind([7], 20, floor=0) == ([26, 27, 28, 29, 7], 16)
    log.ran([26, 27, 28, 29, 7], 16)
    assert log.ids == [*range(10, 30), 7] and log.valid == 21
