"""GGUF's block formats Q4_0, Q4_1 and Q8_0, and grouped Q4_1G and Q8_0G: byte layout, quantizers
and dequantizers.

A block holds 32 consecutive weights of one output row (along the input dimension), so a row of
``in_features`` weights is ``in_features / 32`` blocks and a GGUF tensor's bytes are already the
packed matrix, row after row: loading one needs no conversion.

- ``q4_0``: fp16 ``d``, 16 bytes of nibbles; ``w = (q - 8) * d``  (18 bytes a block)
- ``q4_1``: fp16 ``d``, fp16 ``m``, 16 bytes of nibbles; ``w = q * d + m``  (20 bytes)
- ``q8_0``: fp16 ``d``, 32 int8; ``w = q * d``  (34 bytes)

Grouped formats (``--group-size`` 64, 128, 256) keep one scale (and minimum) per group of G weights
instead of per block of 32, so they take fewer bytes: 4.25 bits a weight for Q4_1G at G = 128
against Q4_1's 5. A row is all its quantized values first, then all its scales:

- ``q4_1g``: ``padded_in / 2`` bytes of nibbles (16 per 32 weights, laid out as in ``q4_1``), then
  per group fp16 ``d`` and fp16 ``m`` (4 bytes); ``w = q * d + m``
- ``q8_0g``: ``padded_in`` int8, then per group fp16 ``d`` (2 bytes); ``w = q * d``

Groups start every G weights; the last one may be shorter (576 weights at G = 128 are four groups
of 128 and one of 64), so a row is padded to whole blocks of 32 only, as in GGUF's formats.

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
    """A block or grouped format; the value is the kernel's format code."""

    Q4_0 = 0
    Q4_1 = 1
    Q8_0 = 2
    Q4_1G = 3
    Q8_0G = 4

    @property
    def grouped(self) -> bool:
        """Scales per group of ``group_size`` weights, stored after the row's values (not GGUF's)."""
        return self in (QuantFormat.Q4_1G, QuantFormat.Q8_0G)

    @property
    def gguf(self) -> bool:
        """A GGUF tensor type (one scale inside each block of 32)."""
        return not self.grouped

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of 32 weights (for a grouped format: its values only, no scale)."""
        return {QuantFormat.Q4_0: 18, QuantFormat.Q4_1: 20, QuantFormat.Q8_0: 34,
                QuantFormat.Q4_1G: 16, QuantFormat.Q8_0G: 32}[self]

    @property
    def scale_bytes(self) -> int:
        """Bytes of one group's scale (and minimum) in a grouped format; 0 for a block format."""
        return {QuantFormat.Q4_1G: 4, QuantFormat.Q8_0G: 2}.get(self, 0)

    def with_group(self, group_size: int) -> QuantFormat:
        """The format that packs ``self``'s numbers with one scale per ``group_size`` weights:
        ``self`` at 32 (GGUF's block), the grouped twin otherwise.

        Raises:
            UsageError: a format without a grouped twin (``q4_0``) at another size.
        """
        if group_size == BLOCK or self.grouped:
            return self
        twin = {QuantFormat.Q4_1: QuantFormat.Q4_1G, QuantFormat.Q8_0: QuantFormat.Q8_0G}.get(self)
        if twin is None:
            raise UsageError(f"{self.label} has one scale per block of {BLOCK} weights only: "
                             f"group size {group_size} needs q4_1 or q8_0")
        return twin

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
        group_size: weights per scale: 32 for GGUF's block formats, a multiple of 32 for a
            grouped one.
    """

    out_features: int
    in_features: int
    fmt: QuantFormat
    group_size: int = BLOCK

    def __post_init__(self) -> None:
        if self.out_features < 1 or self.in_features < 1:
            raise UsageError(
                f"a quantized matrix needs at least one row and column, got "
                f"{self.out_features}x{self.in_features}"
            )
        if self.group_size < BLOCK or self.group_size % BLOCK:
            raise UsageError(f"quantization group size {self.group_size} is not a multiple of {BLOCK}")
        if not self.fmt.grouped and self.group_size != BLOCK:
            raise UsageError(
                f"quantization group size {self.group_size} with {self.fmt.label}, which has one "
                f"scale per block of {BLOCK} weights"
            )

    @property
    def group_blocks(self) -> int:
        """Blocks of 32 per group (the last group of a row may have fewer)."""
        return self.group_size // BLOCK

    @property
    def groups_per_row(self) -> int:
        return -(-self.blocks_per_row // self.group_blocks) if self.fmt.grouped else 0

    @property
    def blocks_per_row(self) -> int:
        return -(-self.in_features // BLOCK)

    @property
    def padded_in(self) -> int:
        """``in_features`` rounded up to whole blocks."""
        return self.blocks_per_row * BLOCK

    @property
    def row_bytes(self) -> int:
        return self.blocks_per_row * self.fmt.block_bytes + self.groups_per_row * self.fmt.scale_bytes


def _half_bytes(values: torch.Tensor) -> torch.Tensor:
    """(..., 1) float16 values as (..., 2) little-endian bytes."""
    return values.contiguous().view(torch.uint8)


def quantize(weight: torch.Tensor, fmt: QuantFormat | str, group_size: int = BLOCK) -> torch.Tensor:
    """A float (out, in) weight packed as (out, row_bytes) uint8 rows of ``fmt``.

    ``in`` need not be a multiple of 32: the last block is padded with zeros, which dequantize to
    exactly 0 (Q4_0, Q8_0) or to the group's ``m`` (Q4_1), and the kernel pads the input with zeros
    to match, so the padding adds exact zeros either way.

    Scales are rounded to fp16 before the weights are divided by them, so the stored integers fit
    the stored scale (llama.cpp's reference divides by the float32 scale). Each rule applies per
    block of 32 (GGUF's formats) or per group of ``group_size`` (Q4_1G, Q8_0G):

    - Q8_0 (``--weights int8``): symmetric, ``d = max|w| / 127``, ``q = round(w / d)``.
    - Q4_0: ``d = w_max / -8`` where ``w_max`` is the weight of largest magnitude (with its sign),
      so that weight lands exactly on ``q = 0`` and the others in ``-8..7``.
    - Q4_1 (``--weights int4``): asymmetric, ``m = min w``, ``d = (max w - min w) / 15``.

    Raises:
        UsageError: a group size other than 32 for a GGUF format (``QuantFormat.with_group`` names
            the grouped one), or a weight that is not 2-D.
    """
    fmt = QuantFormat.parse(fmt)
    if weight.dim() != 2:
        raise UsageError(f"only 2-D weights are quantized, got shape {tuple(weight.shape)}")
    shape = PackedShape(weight.shape[0], weight.shape[1], fmt, group_size)
    w = weight.detach().to(torch.float32)
    if shape.padded_in != shape.in_features:
        w = torch.nn.functional.pad(w, (0, shape.padded_in - shape.in_features))
    if fmt.grouped:
        return aligned(_quantize_grouped(w, shape))
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


def _quantize_grouped(w: torch.Tensor, shape: PackedShape) -> torch.Tensor:
    """(out, padded_in) float32 as Q4_1G or Q8_0G rows: values, then the groups' scales."""
    out, n, g = shape.out_features, shape.padded_in, shape.group_size
    ng = shape.groups_per_row
    # a short last group is filled up with copies of its own last weight: min, max and max|w|
    # stay the group's own
    filled = torch.cat([w, w[:, -1:].expand(out, ng * g - n)], dim=1).reshape(out, ng, g)
    if shape.fmt is QuantFormat.Q8_0G:
        d = (filled.abs().amax(-1) / 127).to(torch.float16)  # (out, ng)
        inv = torch.where(d != 0, 1.0 / d.float(), torch.zeros_like(d, dtype=torch.float32))
        q = torch.round(w * inv.repeat_interleave(g, dim=1)[:, :n]).clamp_(-127, 127)
        values = q.to(torch.int8).view(torch.uint8)
        scales = _half_bytes(d.unsqueeze(-1)).reshape(out, ng * 2)
    else:
        lo = filled.amin(-1)
        d = ((filled.amax(-1) - lo) / 15).to(torch.float16)
        m = lo.to(torch.float16)
        inv = torch.where(d != 0, 1.0 / d.float(), torch.zeros_like(d, dtype=torch.float32))
        per = (m.float().repeat_interleave(g, dim=1)[:, :n], inv.repeat_interleave(g, dim=1)[:, :n])
        q = torch.round((w - per[0]) * per[1]).clamp_(0, 15).to(torch.uint8)
        q = q.reshape(out, shape.blocks_per_row, BLOCK)
        values = (q[..., :16] | (q[..., 16:] << 4)).reshape(out, n // 2)
        scales = torch.cat([_half_bytes(d.unsqueeze(-1)), _half_bytes(m.unsqueeze(-1))],
                           dim=-1).reshape(out, ng * 4)
    return torch.cat([values, scales], dim=1)


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


def dequantize_blocks(blocks: torch.Tensor, fmt: QuantFormat, group_size: int = BLOCK) -> torch.Tensor:
    """(..., row_bytes) uint8 rows as (..., padded_in) float32 weights."""
    if fmt.grouped:
        return _dequantize_grouped(blocks, fmt, group_size)
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


def _dequantize_grouped(rows: torch.Tensor, fmt: QuantFormat, group_size: int) -> torch.Tensor:
    """(..., row_bytes) Q4_1G or Q8_0G rows as (..., padded_in) float32 weights."""
    gb = group_size // BLOCK
    width = rows.shape[-1]
    # width = nb * block_bytes + ceil(nb / gb) * scale_bytes grows with nb, and the floor below
    # is the only nb it can come from (scale_bytes is less than a group's value bytes)
    nb = width * gb // (fmt.block_bytes * gb + fmt.scale_bytes)
    if nb < 1 or nb * fmt.block_bytes + -(-nb // gb) * fmt.scale_bytes != width:
        raise UsageError(f"a {fmt.label} row of {width} bytes is not whole blocks at group size {group_size}")
    lead = rows.shape[:-1]
    ng = -(-nb // gb)
    values = rows[..., : nb * fmt.block_bytes]
    scales = rows[..., nb * fmt.block_bytes :].contiguous().view(torch.float16).float()
    scales = scales.reshape(*lead, ng, fmt.scale_bytes // 2)
    d = scales[..., 0].repeat_interleave(gb, dim=-1)[..., :nb].unsqueeze(-1)  # (..., nb, 1)
    if fmt is QuantFormat.Q8_0G:
        q = values.contiguous().view(torch.int8).float().reshape(*lead, nb, BLOCK)
        w = q * d
    else:
        qs = values.reshape(*lead, nb, 16)
        q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).float()  # (..., nb, 32)
        m = scales[..., 1].repeat_interleave(gb, dim=-1)[..., :nb].unsqueeze(-1)
        w = q * d + m  # q * d is exact: the add is the only rounding, as in the kernel
    return w.reshape(*lead, nb * BLOCK)


def dequantize(packed: torch.Tensor, fmt: QuantFormat | str, in_features: int,
               group_size: int = BLOCK) -> torch.Tensor:
    """Packed (out, row_bytes) rows as the float32 (out, in_features) matrix."""
    fmt = QuantFormat.parse(fmt)
    return dequantize_blocks(packed, fmt, group_size)[..., :in_features]


def dequantize_rows(packed: torch.Tensor, fmt: QuantFormat | str, ids: torch.Tensor,
                    in_features: int | None = None, group_size: int = BLOCK) -> torch.Tensor:
    """Rows ``ids`` of a packed matrix, dequantized: a quantized embedding's lookup.

    Args:
        packed: (num_embeddings, row_bytes) uint8 rows.
        fmt: their format.
        ids: integer tensor of any shape.
        in_features: the embedding width (default: the whole padded row).
        group_size: weights per scale (a grouped format's; 32 for GGUF's).

    Returns:
        float32 tensor of shape ``(*ids.shape, in_features)``, equal bit for bit to the same rows
        of ``dequantize``.
    """
    fmt = QuantFormat.parse(fmt)
    if group_size != BLOCK and not fmt.grouped:
        raise UsageError(f"{fmt.label} has one scale per block of {BLOCK}, not {group_size}")
    rows = packed.index_select(0, ids.reshape(-1))
    w = dequantize_blocks(rows, fmt, group_size)
    if in_features is not None:
        w = w[:, :in_features]
    return w.reshape(*ids.shape, w.shape[-1])
