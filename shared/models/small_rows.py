"""Linear layers that run a product of 2..16 rows through oneDNN, on a CPU in float32.

MKL (the BLAS of torch's CPU wheels) streams a weight once for a one-row product (gemv), but
packs (copies) it on every call for a product of 2 rows or more: SmolLM2's whole model at one
thread, context 200, CPU ms per step of t positions was t=1 59, t=2 93-103, t=3 94-127, t=4 89,
t=9 115 (``scripts/verify_cost.py``), so a speculative verification step cost ~1.5x a decode step
whatever its length. oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``) on the same plain
weight, not reordered and not copied, costs a one-row product's time for 2..5 rows; per op, one
thread, ms for rows 1 (MKL) / 2 / 3 / 5 / 9 (MKL -> oneDNN):

    576->1536    0.31 / 0.48->0.33 / 0.56->0.36 / 0.45->0.40 / 0.54->0.46
    1536->576    0.27 / 0.40->0.29 / 0.47->0.32 / 0.49->0.35 / 0.46->0.41
    576->49152  10.9  / 23.6->10.1 / 35.8->10.9 / 19.0->12.2 / 22.1->14.2   (the LM head)

A weight reordered for oneDNN (``torch.ops.mkldnn._reorder_linear_weight``) is faster still
(SmolLM2, 1 thread: t=2 1.19x, t=3..5 0.95-0.99x, t=9 1.13x of t=1, against 1.30 / 1.34-1.51 /
1.72 here), but it is a second copy of every weight, since one-row products must stay MKL's
on the plain one (SmolLM2: +538 MB on 538 MB; the attention's alone, +106 MB, gains ~5 %): not
kept. MKL's own packed product (``torch.ops.mkl._mkl_linear``) is no faster than oneDNN's here.

Exactness: a oneDNN row differs from MKL's in the last bits, but it does not depend on how many
rows share the product (row i of a t-row product is row i of any longer one) nor on the
weight's address, and every part (the full model, the client's bottom and top, the daemon's
trunk) runs this same code, so full and split compute the same bits for the same chunks.
One-row products (decode steps) stay MKL's, bit for bit; so do products of more than
``MAX_ROWS`` rows (prompts), which transformers' own generate computes the same way.
Without oneDNN (or for a weight that is not a plain float32 CPU tensor) 2- and 3-row products
are padded to 4 rows, the cheaper MKL shape, as before.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 - torch's own spelling

MAX_ROWS = 16
"""Products of 2..MAX_ROWS rows (verification steps, batches of decode steps) go to oneDNN."""

PAD_ROWS = {2: 4, 3: 4}
"""Without oneDNN: rows of a product -> rows it runs as under MKL (2 and 3 rows cost more than 4)."""

_PLAIN = (torch.Tensor, nn.Parameter)
"""Weight types handled: not int8 tensor subclasses (torchao), whose kernels are not MKL's."""

ONEDNN: bool = torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]  # torch leaves it untyped
"""Whether 2..MAX_ROWS-row products use oneDNN (off: the MKL padding; ``scripts/verify_cost.py`` A/Bs it)."""


class SmallRowsLinear(nn.Linear):
    """``nn.Linear`` whose products of 2..``MAX_ROWS`` rows run through oneDNN on the same weight
    (see the module's docstring); one-row products are ``nn.Linear``'s own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = x.shape[-1]
        rows = x.numel() // width if width else 0
        w = self.weight
        if rows < 2 or rows > MAX_ROWS or type(w) not in _PLAIN or w.dtype != torch.float32 or w.device.type != "cpu":
            return super().forward(x)
        flat = x.reshape(rows, width)  # (rows, in)
        if ONEDNN:
            out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(flat.contiguous(), w, self.bias, "none", [], "")
            return out.reshape(*x.shape[:-1], out.shape[-1])  # (rows, out) -> (..., out)
        pad = PAD_ROWS.get(rows)
        if pad is None:
            return super().forward(x)
        flat = torch.cat([flat, flat[-1:].expand(pad - rows, width)])  # (pad, in)
        out = F.linear(flat, w, self.bias)[:rows]  # (rows, out)
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
