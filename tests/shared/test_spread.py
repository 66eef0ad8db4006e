"""A trunk cut over devices (``SpreadPart``) computes what one part computes: bit for bit for a
step and for prefill slices that cross a device boundary; to float rounding for a batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from splitlm.daemon.schedule import SlicedStep
from splitlm.shared.models import PartSpec, build_part, family_for, resolve
from splitlm.shared.models.spread import SpreadPart


def _parts(model: Path, cuts: list[tuple[int, int]]):  # type: ignore[no-untyped-def]
    src = resolve(str(model))
    fam = family_for(src.config)
    cpu = torch.device("cpu")
    whole = build_part(src, fam, PartSpec.trunk(cuts[0][0], cuts[-1][1]), torch.float32, cpu)
    spread = SpreadPart([build_part(src, fam, PartSpec.trunk(a, b), torch.float32, cpu) for a, b in cuts])
    return whole, spread


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gemma3"])  # rotary; learned positions; sliding layers
def test_a_spread_trunk_equals_one_part(tiny_models: dict[str, Path], kind: str) -> None:
    whole, spread = _parts(tiny_models[kind], [(1, 2), (2, 4), (4, 5)])
    assert spread.placement == [("cpu", 1, 2), ("cpu", 2, 4), ("cpu", 4, 5)]
    gen = torch.Generator().manual_seed(0)
    a, b, c = whole.new_cache(), spread.new_cache(), spread.new_cache()
    # a prefill, a decode step, a prefill past the sliding window, a rollback
    for position, t in ((0, 9), (9, 1), (10, 7), (12, 2)):
        h = torch.randn(1, t, 64, generator=gen)  # (1, t, H)
        expected = whole.forward(h, position, a)
        assert torch.equal(spread.forward(h, position, b), expected)
        step = SlicedStep(spread, h, position, c, None, per_slice=3)  # slices 1:4 and 4:5 cross devices
        outs = [step.advance() for _ in range(step.slices)]
        assert outs[-1] is not None and torch.equal(outs[-1], expected)
    assert a.length == b.length == c.length == 14 and a.allocated_bytes() == b.allocated_bytes()


def test_a_batch_through_a_spread_trunk_matches_solo_steps(tiny_models: dict[str, Path]) -> None:
    _, spread = _parts(tiny_models["llama"], [(1, 3), (3, 5)])
    gen = torch.Generator().manual_seed(1)
    solo, rows = [spread.new_cache() for _ in range(2)], [spread.new_cache() for _ in range(2)]
    for i, n in enumerate((4, 7)):
        h = torch.randn(1, n, 64, generator=gen)
        spread.forward(h, 0, solo[i])
        spread.forward(h, 0, rows[i])
    xs = [torch.randn(1, 1, 64, generator=gen) for _ in range(2)]
    expected = [spread.forward(x, p, c) for x, p, c in zip(xs, (4, 7), solo)]
    for c, p in zip(rows, (4, 7)):
        spread.begin_step(xs[0], p, c)
    got = spread.forward_rows(xs, [4, 7], rows)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
    assert [c.length for c in rows] == [5, 8] and (rows[0].start, rows[0].end) == (1, 5)


def test_parts_that_do_not_follow_each_other_are_refused(tiny_models: dict[str, Path]) -> None:
    src = resolve(str(tiny_models["llama"]))
    fam = family_for(src.config)
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="do not follow"):
        SpreadPart([build_part(src, fam, PartSpec.trunk(a, b), torch.float32, cpu) for a, b in ((1, 2), (3, 4))])
