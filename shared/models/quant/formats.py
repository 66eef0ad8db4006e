"""GGUF's block formats Q4_0, Q4_1 and Q8_0: byte layout, quantizers and dequantizers.

A block holds 32 consecutive weights of one output row (along the input dimension), so a row of
``in_features`` weights is ``in_features / 32`` blocks and a GGUF tensor's bytes are already the
packed matrix, row after row: loading one needs no conversion.

- ``q4_0``: fp16 ``d``, 16 bytes of nibbles; ``w = (q - 8) * d``  (18 bytes a block)
- ``q4_1``: fp16 ``d``, fp16 ``m``, 16 bytes of nibbles; ``w = q * d + m``  (20 bytes)
- ``q8_0``: fp16 ``d``, 32 int8; ``w = q * d``  (34 bytes)

In a nibble block byte ``j`` holds element ``j`` in its low nibble and element ``j + 16`` in its high
nibble. Every dequantized weight is ``q * d + c`` (``c`` = ``-8d``, ``m`` or 0), computed so that
the only rounding is the add, as ``gguf.quants.dequantize`` and the C kernel do: the three agree
bit for bit.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from splitlm.shared.errors import UsageError

BLOCK = 32
"""Weights per block (GGUF's ``QK``)."""


class QuantFormat(enum.Enum):
    """A block format; the value is the kernel's format code."""

    Q4_0 = 0
    Q4_1 = 1
    Q8_0 = 2

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of 32 weights."""
        return {QuantFormat.Q4_0: 18, QuantFormat.Q4_1: 20, QuantFormat.Q8_0: 34}[self]

    @property
    def label(self) -> str:
        """The lower-case name (``q4_0``), as settings and GGUF's type names spell it."""
        return self.name.lower()

    @classmethod
    def parse(cls, value: QuantFormat | str) -> QuantFormat:
        """A format from its name (``q4_0``, ``Q4_1``, ...).

        Raises:
            UsageError: not one of the three names.
        """
        if isinstance(value, QuantFormat):
            return value
        try:
            return cls[value.upper()]
        except KeyError:
            names = ", ".join(f.label for f in cls)
            raise UsageError(f"unknown quantized format {value!r}: expected one of {names}") from None


@dataclass(frozen=True)
class PackedShape:
    """How a (out_features, in_features) matrix is laid out in blocks.

    Attributes:
        out_features: rows.
        in_features: the real input width; the packed rows cover ``padded_in`` (zeros past it).
        fmt: the block format.
    """

    out_features: int
    in_features: int
    fmt: QuantFormat

    def __post_init__(self) -> None:
        if self.out_features < 1 or self.in_features < 1:
            raise UsageError(
                f"a quantized matrix needs at least one row and column, got "
                f"{self.out_features}x{self.in_features}"
            )

    @property
    def blocks_per_row(self) -> int:
        return -(-self.in_features // BLOCK)

    @property
    def padded_in(self) -> int:
        """``in_features`` rounded up to whole blocks."""
        return self.blocks_per_row * BLOCK

    @property
    def row_bytes(self) -> int:
        return self.blocks_per_row * self.fmt.block_bytes


def _half_bytes(values: torch.Tensor) -> torch.Tensor:
    """(..., 1) float16 values as (..., 2) little-endian bytes."""
    return values.contiguous().view(torch.uint8)


def quantize(weight: torch.Tensor, fmt: QuantFormat | str, group_size: int = BLOCK) -> torch.Tensor:
    """A float (out, in) weight packed as (out, row_bytes) uint8 blocks of ``fmt``.

    ``in`` need not be a multiple of 32: the last block is padded with zeros, which dequantize to
    exactly 0 (Q4_0, Q8_0) or to the block's ``m`` (Q4_1), and the kernel pads the input with zeros
    to match, so the padding adds exact zeros either way.

    Scales are rounded to fp16 before the weights are divided by them, so the stored integers fit
    the stored scale (llama.cpp's reference divides by the float32 scale).

    - Q8_0 (``--weights int8``): symmetric, ``d = max|w| / 127``, ``q = round(w / d)``.
    - Q4_0: ``d = w_max / -8`` where ``w_max`` is the weight of largest magnitude (with its sign),
      so that weight lands exactly on ``q = 0`` and the others in ``-8..7``.
    - Q4_1 (``--weights int4``): asymmetric, ``m = min w``, ``d = (max w - min w) / 15``.

    Raises:
        UsageError: a group size other than 32, or a weight that is not 2-D.
    """
    fmt = QuantFormat.parse(fmt)
    if group_size != BLOCK:
        raise UsageError(
            f"quantization group size {group_size} is not supported: the formats are GGUF's, with "
            f"one scale per block of {BLOCK} weights"
        )
    if weight.dim() != 2:
        raise UsageError(f"only 2-D weights are quantized, got shape {tuple(weight.shape)}")
    shape = PackedShape(weight.shape[0], weight.shape[1], fmt)
    w = weight.detach().to(torch.float32)
    if shape.padded_in != shape.in_features:
        w = torch.nn.functional.pad(w, (0, shape.padded_in - shape.in_features))
    w = w.reshape(shape.out_features, shape.blocks_per_row, BLOCK)  # (out, nb, 32)
    if fmt is QuantFormat.Q8_0:
        d = (w.abs().amax(-1, keepdim=True) / 127).to(torch.float16)
        inv = torch.where(d != 0, 1.0 / d.float(), torch.zeros_like(d, dtype=torch.float32))
        q = torch.round(w * inv).clamp_(-127, 127).to(torch.int8).view(torch.uint8)
        body = torch.cat([_half_bytes(d), q], dim=-1)
    elif fmt is QuantFormat.Q4_0:
        idx = w.abs().argmax(-1, keepdim=True)
        extreme = w.gather(-1, idx)
        d = (extreme / -8).to(torch.float16)
        inv = torch.where(d != 0, 1.0 / d.float(), torch.zeros_like(d, dtype=torch.float32))
        q = torch.floor(w * inv + 8.5).clamp_(0, 15).to(torch.uint8)
        body = torch.cat([_half_bytes(d), q[..., :16] | (q[..., 16:] << 4)], dim=-1)
    else:
        lo = w.amin(-1, keepdim=True)
        hi = w.amax(-1, keepdim=True)
        d = ((hi - lo) / 15).to(torch.float16)
        m = lo.to(torch.float16)
        inv = torch.where(d != 0, 1.0 / d.float(), torch.zeros_like(d, dtype=torch.float32))
        q = torch.round((w - m.float()) * inv).clamp_(0, 15).to(torch.uint8)
        body = torch.cat([_half_bytes(d), _half_bytes(m), q[..., :16] | (q[..., 16:] << 4)], dim=-1)
    return aligned(body.reshape(shape.out_features, shape.row_bytes))


def aligned(packed: torch.Tensor, alignment: int = 64) -> torch.Tensor:
    """``packed`` as a contiguous tensor whose data starts on an ``alignment``-byte boundary.

    torch's CPU allocator already aligns to 64 bytes; a view into a GGUF file (aligned to 32) or
    into another tensor may not be, and is copied once here.
    """
    if packed.is_contiguous() and packed.data_ptr() % alignment == 0:
        return packed
    out = torch.empty(packed.numel() + alignment, dtype=torch.uint8, device=packed.device)
    skip = (-out.data_ptr()) % alignment
    out = out[skip : skip + packed.numel()].view(packed.shape)
    out.copy_(packed)
    return out


def dequantize_blocks(blocks: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """(..., row_bytes) uint8 blocks as (..., padded_in) float32 weights."""
    nb = blocks.shape[-1] // fmt.block_bytes
    b = blocks.reshape(*blocks.shape[:-1], nb, fmt.block_bytes)
    d = b[..., 0:2].contiguous().view(torch.float16).float()  # (..., nb, 1)
    if fmt is QuantFormat.Q8_0:
        q = b[..., 2:].contiguous().view(torch.int8).float()
        w = q * d
    else:
        start = 2 if fmt is QuantFormat.Q4_0 else 4
        qs = b[..., start:]
        q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).float()  # (..., nb, 32)
        c = -8 * d if fmt is QuantFormat.Q4_0 else b[..., 2:4].contiguous().view(torch.float16).float()
        w = q * d + c  # q * d is exact: the add is the only rounding, as in the kernel
    return w.reshape(*blocks.shape[:-1], nb * BLOCK)


def dequantize(packed: torch.Tensor, fmt: QuantFormat | str, in_features: int) -> torch.Tensor:
    """Packed (out, row_bytes) blocks as the float32 (out, in_features) matrix."""
    fmt = QuantFormat.parse(fmt)
    return dequantize_blocks(packed, fmt)[..., :in_features]


def dequantize_rows(packed: torch.Tensor, fmt: QuantFormat | str, ids: torch.Tensor,
                    in_features: int | None = None) -> torch.Tensor:
    """Rows ``ids`` of a packed matrix, dequantized: a quantized embedding's lookup.

    Args:
        packed: (num_embeddings, row_bytes) uint8 blocks.
        fmt: their format.
        ids: integer tensor of any shape.
        in_features: the embedding width (default: the whole padded row).

    Returns:
        float32 tensor of shape ``(*ids.shape, in_features)``, equal bit for bit to the same rows
        of ``dequantize``.
    """
    fmt = QuantFormat.parse(fmt)
    rows = packed.index_select(0, ids.reshape(-1))
    w = dequantize_blocks(rows, fmt)
    if in_features is not None:
        w = w[:, :in_features]
    return w.reshape(*ids.shape, w.shape[-1])
