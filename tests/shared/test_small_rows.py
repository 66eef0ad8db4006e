"""2- and 3-row products run as 4 rows (``shared.models.small_rows``): the same numbers as an
unpadded product to rounding, the same bits on every part, so the full model and the split
still agree bit for bit on verification steps of 2 and 3 positions."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from splitlm.shared.models import PartSpec, family_for, resolve
from splitlm.shared.models.base import build_parts
from splitlm.shared.models.small_rows import PAD_ROWS, SmallRowsLinear, pad_small_products, unpad


def test_a_padded_product_is_the_4_row_products_rows() -> None:
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(48, 80)
    with torch.no_grad():
        lin.weight.normal_(generator=g)
        lin.bias.normal_(generator=g)
    pad_small_products(lin)
    assert type(lin) is SmallRowsLinear
    for rows in (1, 2, 3, 4, 5):
        x = torch.randn(1, rows, 48, generator=g)  # (1, t, in)
        out = lin(x)
        assert out.shape == (1, rows, 80)
        torch.testing.assert_close(out, nn.functional.linear(x, lin.weight, lin.bias))
        if rows in PAD_ROWS:
            four = torch.cat([x, x[:, -1:].expand(1, PAD_ROWS[rows] - rows, 48)], dim=1)
            assert torch.equal(out, nn.functional.linear(four, lin.weight, lin.bias)[:, :rows])
        else:
            assert torch.equal(out, nn.functional.linear(x, lin.weight, lin.bias))
    unpad(lin)
    assert type(lin) is nn.Linear


def test_batched_rows_are_padded_too() -> None:
    """A batch of one-position steps (the daemon's ``--batch``) is a product of B rows."""
    lin = nn.Linear(16, 8)
    pad_small_products(lin)
    x = torch.randn(3, 1, 16)  # (B, 1, in)
    torch.testing.assert_close(lin(x), nn.functional.linear(x, lin.weight, lin.bias))


def test_full_and_split_parts_agree_bit_for_bit_on_2_and_3_position_steps(tiny_models: dict[str, Path]) -> None:
    src = resolve(str(tiny_models["llama"]))
    family = family_for(src.config)
    specs = [PartSpec.full(6), PartSpec.bottom(2), PartSpec.trunk(2, 4), PartSpec.top(4, 6)]
    full, bottom, trunk, top = build_parts(src, family, specs, torch.float32, torch.device("cpu"))
    assert all(type(m) is SmallRowsLinear for m in full.model.modules() if isinstance(m, nn.Linear))
    caches = [p.new_cache() for p in (full, bottom, trunk, top)]
    position = 0
    for ids in ([5, 17, 42, 99, 7, 3, 250, 11], [8, 9], [31, 200, 150], [4], [9, 77, 12]):
        x = torch.tensor([ids])
        want = full.forward(x, position, caches[0], logits_for=len(ids))
        h = trunk.forward(bottom.forward(x, position, caches[1]), position, caches[2])
        got = top.forward(h, position, caches[3], logits_for=len(ids))
        assert torch.equal(got, want), f"step of {len(ids)} positions at {position}"
        position += len(ids) - 1  # the last position is verified again, as after a rejection
