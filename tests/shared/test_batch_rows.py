"""``Part.forward_rows``: one-position steps of several sessions run as one batch through the trunk
compute what each session computes alone, for every family (sliding windows, Gemma 3's two rotary
tables), with sessions of different lengths, one of them rolled back."""

from __future__ import annotations

import pytest
import torch

from splitlm.shared.cache import PartCache
from splitlm.shared.errors import InvalidStep
from splitlm.shared.models import Part, PartSpec, build_parts, family_for, resolve
from tests.conftest import FAMILY_KINDS
from tests.shared.test_engine import PROMPT

PROMPTS = [PROMPT[:3], PROMPT, PROMPT[5:14], PROMPT[:1] + PROMPT[::-1]]
"""Lengths 3, 20, 9, 21: on both sides of the tiny sliding window (6)."""


class Session:
    """Bottom and top run alone; the trunk alone or as a row of a batch."""

    def __init__(self, parts: list[Part], prompt: list[int]) -> None:
        self.parts = parts
        self.caches: list[PartCache] = [p.new_cache() for p in parts]
        self.ids = list(prompt)
        bottom, trunk, top = parts
        h = bottom.forward(torch.tensor([self.ids]), 0, self.caches[0])
        h = trunk.forward(h, 0, self.caches[1])
        self.next = int(top.forward(h, 0, self.caches[2])[0, -1].argmax())

    def bottom(self) -> torch.Tensor:
        self.ids.append(self.next)
        return self.parts[0].forward(torch.tensor([[self.next]]), len(self.ids) - 1, self.caches[0])

    def top(self, h: torch.Tensor) -> None:
        self.next = int(self.parts[2].forward(h, len(self.ids) - 1, self.caches[2])[0, -1].argmax())


def _parts(path) -> list[Part]:  # type: ignore[no-untyped-def]
    src = resolve(str(path))
    n = src.config.num_hidden_layers
    specs = [PartSpec.bottom(1), PartSpec.trunk(1, n - 1), PartSpec.top(n - 1, n)]
    return build_parts(src, family_for(src.config), specs, torch.float32, torch.device("cpu"))


def _decode(parts: list[Part], steps: int, batched: bool) -> tuple[list[list[int]], list[torch.Tensor]]:
    sessions = [Session(parts, p) for p in PROMPTS]
    trunk = parts[1]
    hidden: list[torch.Tensor] = []
    for _ in range(steps):
        xs = [s.bottom() for s in sessions]
        positions = [len(s.ids) - 1 for s in sessions]
        if batched:
            for x, p, s in zip(xs, positions, sessions):
                trunk.begin_step(x, p, s.caches[1])
            outs = trunk.forward_rows(xs, positions, [s.caches[1] for s in sessions])
        else:
            outs = [trunk.forward(x, p, s.caches[1]) for x, p, s in zip(xs, positions, sessions)]
        hidden.extend(outs)
        for s, h in zip(sessions, outs):
            s.top(h)
    return [s.ids for s in sessions], hidden


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_batched_rows_equal_solo_steps(tiny_models, kind) -> None:  # type: ignore[no-untyped-def]
    parts = _parts(tiny_models[kind])
    solo_ids, solo_h = _decode(parts, 12, batched=False)
    batch_ids, batch_h = _decode(parts, 12, batched=True)
    assert batch_ids == solo_ids
    for a, b in zip(solo_h, batch_h):
        assert a.shape == b.shape == (1, 1, parts[1].hidden_size)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    # the model's own attention implementation is back after the batch
    assert parts[1].model.config._attn_implementation != "splitlm_rows"


def test_rows_roll_back_and_grow_their_own_caches(tiny_models) -> None:
    """A row that goes back (regenerate) and rows at other lengths: each cache ends at its own
    position + 1, and equals the cache of the same steps run alone."""
    parts = _parts(tiny_models["gemma3"])
    trunk = parts[1]

    def run(batched: bool) -> list[PartCache]:
        sessions = [Session(parts, p) for p in PROMPTS]
        xs = [s.bottom() for s in sessions]
        positions = [len(s.ids) - 1 for s in sessions]
        positions[1] -= 4  # session 1 regenerates from 4 positions back
        caches = [s.caches[1] for s in sessions]
        if batched:
            for x, p, c in zip(xs, positions, caches):
                trunk.begin_step(x, p, c)
            trunk.forward_rows(xs, positions, caches)
        else:
            for x, p, c in zip(xs, positions, caches):
                trunk.forward(x, p, c)
        assert [c.length for c in caches] == [p + 1 for p in positions]
        return caches

    for solo, batch in zip(run(False), run(True)):
        for i in range(trunk.spec.start, trunk.spec.end):
            torch.testing.assert_close(batch.layers[i].keys, solo.layers[i].keys, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(batch.layers[i].values, solo.layers[i].values, rtol=1e-5, atol=1e-5)


def test_rows_take_one_position_steps_only(tiny_models) -> None:
    trunk = _parts(tiny_models["llama"])[1]
    cache = trunk.new_cache()
    with pytest.raises(InvalidStep):
        trunk.forward_rows([torch.zeros(1, 2, trunk.hidden_size)], [0], [cache])
