"""Weights start on 64-byte boundaries, whatever the file they were read from: MKL's one-row
product rounds differently for a weight off a 16-byte boundary, so a part that kept a
memory-mapped tensor where the file put it computed other last bits than a part that did not
(the full model here vs the daemon's trunk on SmolLM2's decode steps)."""

from __future__ import annotations

from pathlib import Path

import torch

from splitlm.shared.models import PartSpec, family_for, resolve
from splitlm.shared.models.base import WEIGHT_ALIGNMENT, aligned, build_parts


def test_an_unaligned_tensor_is_copied_to_an_aligned_one() -> None:
    buf = torch.arange(1 + 12 * 8, dtype=torch.float32)
    off = buf[1:].view(12, 8)  # 4 bytes past the allocation's start
    assert off.data_ptr() % WEIGHT_ALIGNMENT != 0
    out = aligned(off)
    assert out.data_ptr() % WEIGHT_ALIGNMENT == 0 and torch.equal(out, off)
    fine = torch.zeros(3, 5)
    assert aligned(fine) is fine  # no copy when there is nothing to fix


def test_one_row_products_depend_on_the_weights_alignment() -> None:
    """The same values off a 16-byte boundary give other bits under MKL (found on SmolLM2):
    the aligned copy gives the bits of a fresh allocation."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1536, 576, generator=g)
    x = torch.randn(1, 576, generator=g)
    buf = torch.empty(w.numel() + 1)
    shifted = buf[1:].view_as(w)
    shifted.copy_(w)
    assert shifted.data_ptr() % 16 != 0
    # the copy computes what a fresh allocation of the same values computes, bit for bit
    assert torch.equal(torch.nn.functional.linear(x, aligned(shifted)), torch.nn.functional.linear(x, w))


def test_every_weight_of_a_built_part_is_aligned(tiny_models: dict[str, Path]) -> None:
    src = resolve(str(tiny_models["llama"]))
    family = family_for(src.config)
    specs = [PartSpec.full(6), PartSpec.bottom(2), PartSpec.trunk(2, 4), PartSpec.top(4, 6)]
    for part in build_parts(src, family, specs, torch.float32, torch.device("cpu")):
        for name, p in part.model.named_parameters():
            if p.device.type == "cpu":
                assert p.data_ptr() % WEIGHT_ALIGNMENT == 0, (part.spec.name, name)
