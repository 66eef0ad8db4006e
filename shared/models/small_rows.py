"""Linear layers that run a product of 2 or 3 rows as one of 4, on a CPU in float32.

MKL (the BLAS of torch's CPU wheels) multiplies 2 or 3 rows by a weight it streams from memory
far slower than 4: SmolLM2's whole model at one thread, context 200, CPU time per step of t
positions was t=1 59.5 ms, t=2 103, t=3 127, t=4 89.5, t=5 100 (``scripts/verify_cost.py``;
the profile puts it in the products, the LM head's most: 60 ms for 3 rows, 21 for 4). A
speculative verification step of 2 or 3 positions (a draft of 1 or 2 tokens, the common case
once acceptance drops) cost more than one of 4. Four rows, the last repeated, cost what 4 cost
(t=2 93 ms, t=3 94 ms), and the extra rows are dropped.

Exactness: a row of a 4-row product is not bit-identical to the same row in a 2-row product,
but every part pads the same way, so the full model and the split (whose trunk runs this same
code in the daemon) still compute the same bits for the same chunks. One-row products (decode
steps) and products of 4 rows or more are untouched.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 - torch's own spelling

PAD_ROWS = {2: 4, 3: 4}
"""Rows of a product -> rows it runs as (measured on MKL, float32, one and two threads)."""

_PLAIN = (torch.Tensor, nn.Parameter)
"""Weight types padded: not int8 tensor subclasses (torchao), whose kernels are not MKL's."""


class SmallRowsLinear(nn.Linear):
    """``nn.Linear`` that pads a product of ``PAD_ROWS`` rows (see the module's docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = x.shape[-1]
        rows = x.numel() // width if width else 0
        pad = PAD_ROWS.get(rows)
        if pad is None or type(self.weight) not in _PLAIN:
            return super().forward(x)
        flat = x.reshape(rows, width)  # (rows, in)
        flat = torch.cat([flat, flat[-1:].expand(pad - rows, width)])  # (pad, in)
        out = F.linear(flat, self.weight, self.bias)[:rows]  # (rows, out)
        return out.reshape(*x.shape[:-1], out.shape[-1])  # (..., out)


def pad_small_products(model: nn.Module) -> int:
    """Make every plain ``nn.Linear`` of ``model`` a ``SmallRowsLinear`` (same weights, same
    module tree: only the class changes); returns how many. Call for float32 parts on a CPU."""
    n = 0
    for m in model.modules():
        if type(m) is nn.Linear:
            m.__class__ = SmallRowsLinear
            n += 1
    return n


def unpad(model: nn.Module) -> None:
    """Undo ``pad_small_products`` (for an A/B measurement)."""
    for m in model.modules():
        if type(m) is SmallRowsLinear:
            m.__class__ = nn.Linear  # type: ignore[assignment]  # the class swap back
