"""Products of 2..16 rows run through oneDNN (``shared.models.small_rows``; 2 and 3 rows padded to
4 without it): the same numbers as MKL's product to rounding, one-row products MKL's bit for bit,
the same bits on every part, so the full model and the split still agree bit for bit on
verification steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from splitlm.shared.models import PartSpec, family_for, resolve, small_rows
from splitlm.shared.models.base import build_parts
from splitlm.shared.models.small_rows import (
    MAX_ROWS,
    PAD_ROWS,
    SmallRowsLinear,
    pad_small_products,
    unpad,
)


def _linear(rows_in: int, rows_out: int, seed: int) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(rows_in, rows_out)
    with torch.no_grad():
        lin.weight.normal_(generator=g)
        lin.bias.normal_(generator=g)
    return lin


@pytest.mark.skipif(not small_rows.ONEDNN, reason="torch built without oneDNN")
def test_onednn_rows_do_not_depend_on_the_products_length() -> None:
    """Row i of a t-row product is row i of any longer one (2..MAX_ROWS), so a verification step's
    bits do not depend on how the chunk was cut; one row and more than MAX_ROWS stay MKL's."""
    lin = _linear(96, 160, seed=1)
    x = torch.randn(1, MAX_ROWS + 4, 96, generator=torch.Generator().manual_seed(2))  # (1, t, in)
    plain = nn.functional.linear(x, lin.weight, lin.bias)
    pad_small_products(lin)
    longest = lin(x[:, :MAX_ROWS])
    torch.testing.assert_close(longest, plain[:, :MAX_ROWS])
    for rows in range(2, MAX_ROWS):
        assert torch.equal(lin(x[:, :rows]), longest[:, :rows]), f"{rows} rows"
    assert torch.equal(lin(x[:, :1]), nn.functional.linear(x[:, :1], lin.weight, lin.bias))
    assert torch.equal(lin(x), plain)  # MAX_ROWS + 4 rows: a prompt, MKL's
    with torch.inference_mode():  # how parts run
        assert torch.equal(lin(x[:, :3]), longest[:, :3])


def test_without_onednn_2_and_3_rows_are_padded_to_4(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(small_rows, "ONEDNN", False)
    lin = _linear(48, 80, seed=0)
    g = torch.Generator().manual_seed(3)
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


def test_batched_rows_take_the_multi_row_path_too() -> None:
    """A batch of one-position steps (the daemon's ``--batch``) is a product of B rows."""
    lin = nn.Linear(16, 8)
    pad_small_products(lin)
    x = torch.randn(3, 1, 16)  # (B, 1, in)
    torch.testing.assert_close(lin(x), nn.functional.linear(x, lin.weight, lin.bias))


def test_full_and_split_parts_agree_bit_for_bit_on_multi_position_steps(tiny_models: dict[str, Path]) -> None:
    src = resolve(str(tiny_models["llama"]))
    family = family_for(src.config)
    specs = [PartSpec.full(6), PartSpec.bottom(2), PartSpec.trunk(2, 4), PartSpec.top(4, 6)]
    full, bottom, trunk, top = build_parts(src, family, specs, torch.float32, torch.device("cpu"))
    assert all(type(m) is SmallRowsLinear for m in full.model.modules() if isinstance(m, nn.Linear))
    caches = [p.new_cache() for p in (full, bottom, trunk, top)]
    position = 0
    steps = ([5, 17, 42, 99, 7, 3, 250, 11], [8, 9], [31, 200, 150], [4], [9, 77, 12], list(range(20, 37)))
    for ids in steps:  # a prompt of 8 and one of 17 (> MAX_ROWS: MKL), steps of 1, 2, 3
        x = torch.tensor([ids])
        want = full.forward(x, position, caches[0], logits_for=len(ids))
        h = trunk.forward(bottom.forward(x, position, caches[1]), position, caches[2])
        got = top.forward(h, position, caches[3], logits_for=len(ids))
        assert torch.equal(got, want), f"step of {len(ids)} positions at {position}"
        position += len(ids) - 1  # the last position is verified again, as after a rejection
