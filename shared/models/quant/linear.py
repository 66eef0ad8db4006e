"""``QuantLinear``: a linear layer whose weight stays in a GGUF block format and runs in our kernel."""

from __future__ import annotations

import ctypes
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from splitlm.shared.errors import UsageError
from splitlm.shared.models.quant.build import Kernel, LayerArgs, kernel
from splitlm.shared.models.quant.formats import (
    BLOCK,
    PackedShape,
    QuantFormat,
    aligned,
    dequantize,
    dequantize_rows,
    quantize,
)


@dataclass(frozen=True)
class _Plan:
    """What ``QuantLinear.forward`` hands the kernel, kept between calls with the tensors it
    points into (they must outlive it)."""

    packed: torch.Tensor
    bias: torch.Tensor | None
    bias32: torch.Tensor | None
    args: LayerArgs
    args_ref: Any
    run: Any


MIN_WORK_PER_THREAD = 1 << 18
"""Work (out x in x rows, rows counted up to 8) each thread must have before another is used:
a one-row 576x576 product (~30 us) stays on one thread, a 1536x576 one takes two. Not tuned: on
the loaded 2-core machine of 2026-12-01 a second thread seldom got a core; re-measure with
``scripts/quant_ab.py --threads 2`` on a quiet one."""


def _threads(out_features: int, in_features: int, rows: int) -> int:
    """Threads for one call: at most torch's setting, fewer for small products.

    The result does not depend on this choice (threads split output features only), so it is
    free to vary with the size of the call.
    """
    work = out_features * in_features * max(1, min(rows, 8))
    return max(1, min(torch.get_num_threads(), work // MIN_WORK_PER_THREAD))


class QuantLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` packed in blocks of 32 (``q4_0``, ``q4_1`` or ``q8_0``).

    The packed weight is a buffer (``packed``, uint8, (out_features, row_bytes)), so ``.to()``,
    ``state_dict`` and ``load_state_dict`` carry it; the bias, when there is one, is a float32
    buffer too (the weights are not trained here).

    ``forward`` runs the C kernel for float32 and bfloat16 inputs of any number of rows. Each
    output row is computed in one fixed order, so it does not depend on the thread count nor on
    the other rows in the call: a split model (client and daemon with their own thread counts)
    equals the whole model bit for bit, and a batch of rows equals the rows run one by one.
    """

    packed: torch.Tensor
    bias: torch.Tensor | None
    _cached_plan: _Plan | None

    def __init__(self, in_features: int, out_features: int, fmt: QuantFormat | str,
                 packed: torch.Tensor, bias: torch.Tensor | None = None,
                 group_size: int = BLOCK) -> None:
        super().__init__()
        self.shape = PackedShape(out_features, in_features, QuantFormat.parse(fmt), group_size)
        if packed.dtype != torch.uint8 or tuple(packed.shape) != (out_features, self.shape.row_bytes):
            raise UsageError(
                f"packed {self.shape.fmt.label} weight for {out_features}x{in_features} must be "
                f"uint8 of shape ({out_features}, {self.shape.row_bytes}), got "
                f"{packed.dtype} {tuple(packed.shape)}"
            )
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise UsageError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
        self.register_buffer("packed", aligned(packed))
        self.register_buffer(
            "bias", None if bias is None else bias.detach().to(torch.float32).contiguous()
        )
        self._cached_plan = None

    def __getstate__(self) -> dict[str, Any]:
        """For ``copy.deepcopy`` and pickling: the plan holds ctypes pointers, rebuilt on use."""
        state = self.__dict__.copy()
        state["_cached_plan"] = None
        return state

    @property
    def in_features(self) -> int:
        return self.shape.in_features

    @property
    def out_features(self) -> int:
        return self.shape.out_features

    @property
    def fmt(self) -> QuantFormat:
        return self.shape.fmt

    @property
    def group_size(self) -> int:
        """Weights per scale: 32 for GGUF's formats."""
        return self.shape.group_size

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   fmt: QuantFormat | str = QuantFormat.Q4_1, group_size: int = BLOCK) -> QuantLinear:
        """Quantize a float (out, in) weight (see ``formats.quantize`` for each format's rule).

        ``fmt`` names the numbers (``q4_1``, ``q8_0``); a ``group_size`` other than 32 packs them
        in the grouped twin (``q4_1g``, ``q8_0g``), one scale per ``group_size`` weights.

        Raises:
            UsageError: ``q4_0`` at a group size other than 32, or a size not a multiple of 32.
        """
        fmt = QuantFormat.parse(fmt).with_group(group_size)
        packed = quantize(weight, fmt, group_size)
        return cls(weight.shape[1], weight.shape[0], fmt, packed, bias, group_size)

    @classmethod
    def from_blocks(cls, raw: torch.Tensor | np.ndarray[Any, Any], fmt: QuantFormat | str,
                    out_features: int, in_features: int,
                    bias: torch.Tensor | None = None) -> QuantLinear:
        """A layer on GGUF bytes as they come: (out_features, bytes_per_row) uint8.

        The bytes are used in place when they start on a 64-byte boundary, else copied once. In
        place means a read-only memory map of the file stays read-only: the layer's bytes are
        shared with the page cache (and with every process mapping the file), and must not be
        written (no ``load_state_dict`` into such a layer).
        """
        if isinstance(raw, np.ndarray):
            with warnings.catch_warnings():
                # a read-only memory map of the GGUF file: the buffer is never written
                warnings.simplefilter("ignore", UserWarning)
                raw = torch.from_numpy(np.ascontiguousarray(raw).view(np.uint8))
        shape = PackedShape(out_features, in_features, QuantFormat.parse(fmt))
        if not shape.fmt.gguf:
            raise UsageError(f"{shape.fmt.label} is splitlm's own format, not a GGUF tensor type")
        if shape.padded_in != in_features:
            raise UsageError(
                f"GGUF {shape.fmt.label} rows hold whole blocks of {BLOCK}: in_features "
                f"{in_features} is not a multiple"
            )
        return cls(in_features, out_features, shape.fmt, raw.reshape(out_features, -1), bias)

    @property
    def nbytes(self) -> int:
        """Bytes of the packed weight and the bias."""
        extra = 0 if self.bias is None else self.bias.numel() * 4
        return self.packed.numel() + extra

    def dequantize(self) -> torch.Tensor:
        """The float32 (out, in) weight the packed blocks stand for."""
        return dequantize(self.packed, self.fmt, self.in_features, self.group_size)

    def _plan(self) -> _Plan:
        """The kernel's fixed arguments for the current buffers (rebuilt after ``.to()`` or a
        buffer swap: the plan remembers which tensors it points into)."""
        packed, bias = self._buffers["packed"], self._buffers["bias"]
        plan = self._cached_plan
        if plan is None or plan.packed is not packed or plan.bias is not bias:
            assert packed is not None
            if packed.device.type != "cpu":
                raise UsageError("quantized weights run on the CPU only")
            bias32 = None if bias is None else bias.to(torch.float32).contiguous()
            lib = kernel()
            args = LayerArgs(self.fmt.value, packed.data_ptr(), self.shape.row_bytes,
                             self.out_features, self.shape.blocks_per_row,
                             None if bias32 is None else bias32.data_ptr(), self.shape.group_blocks)
            plan = self._cached_plan = _Plan(packed, bias, bias32, args, ctypes.byref(args),
                                             lib.lib.splitlm_quant_layer_run)
        return plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self._plan()
        shape = self.shape
        if (x.dtype is not torch.float32 or x.shape[-1] != shape.in_features
                or shape.padded_in != shape.in_features or not x.is_contiguous()
                or x.device.type != "cpu"):
            return quant_linear(x, plan.packed, shape, plan.bias32)
        # the common case, float32 rows of whole blocks, with as few Python steps as possible:
        # a decode step makes ~210 of these calls
        rows = x.numel() // shape.in_features
        y = x.new_empty((*x.shape[:-1], shape.out_features))
        if rows:
            plan.run(plan.args_ref, x.data_ptr(), rows, y.data_ptr(),
                     _threads(shape.out_features, shape.in_features, rows))
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"fmt={self.fmt.label}, bias={self.bias is not None}"
                + (f", group_size={self.group_size}" if self.fmt.grouped else ""))



def quant_linear(x: torch.Tensor, packed: torch.Tensor, shape: PackedShape,
                 bias: torch.Tensor | None = None, threads: int | None = None,
                 lib: Kernel | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for packed ``W``; ``x`` is (..., in_features) float32 or bfloat16.

    Args:
        threads: threads to use (default: torch's setting, fewer for small products); the result
            is the same for every value.
        lib: the kernel library (default: this machine's native build); the tests pass the AVX2
            and portable builds to cover those paths.

    Returns:
        (..., out_features) in ``x``'s dtype.
    """
    if x.shape[-1] != shape.in_features:
        raise UsageError(f"expected input width {shape.in_features}, got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16):
        raise UsageError(f"quantized linear takes float32 or bfloat16 input, got {x.dtype}")
    if packed.device.type != "cpu" or x.device.type != "cpu":
        raise UsageError("quantized weights run on the CPU only")
    if packed.dtype != torch.uint8 or tuple(packed.shape) != (shape.out_features, shape.row_bytes) \
            or not packed.is_contiguous():
        raise UsageError(f"packed weight must be contiguous uint8 ({shape.out_features}, "
                         f"{shape.row_bytes}), got {packed.dtype} {tuple(packed.shape)}")
    if bias is not None:  # a module moved with .to(bfloat16) carries a bfloat16 bias
        bias = bias.to(torch.float32).contiguous()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, shape.in_features).to(torch.float32)
    pad = shape.padded_in - shape.in_features
    if pad:  # zeros against the padded weights add exact zeros
        x2 = torch.nn.functional.pad(x2, (0, pad))
    x2 = x2.contiguous()
    rows = x2.shape[0]
    y = torch.empty(rows, shape.out_features, dtype=torch.float32)
    if rows:
        if threads is None:
            threads = _threads(shape.out_features, shape.in_features, rows)
        rc = (lib or kernel()).lib.splitlm_quant_linear(
            shape.fmt.value, packed.data_ptr(), shape.row_bytes, shape.out_features,
            shape.blocks_per_row, shape.group_blocks, x2.data_ptr(), rows, shape.padded_in,
            None if bias is None else bias.data_ptr(), y.data_ptr(), shape.out_features, threads,
        )
        if rc != 0:
            raise RuntimeError(f"the quant kernel does not know format code {shape.fmt.value}")
    return y.to(x.dtype).reshape(*lead, shape.out_features)


class QuantEmbedding(nn.Module):
    """An embedding table kept in a block format: a lookup dequantizes only the rows it needs.

    A tied head and embedding share one packed tensor (``from_linear``), so a model holds the
    49152 x 576 matrix once, packed. Rows equal ``dequantize()``'s bit for bit.
    """

    packed: torch.Tensor

    def __init__(self, num_embeddings: int, embedding_dim: int, fmt: QuantFormat | str,
                 packed: torch.Tensor, group_size: int = BLOCK) -> None:
        super().__init__()
        self.shape = PackedShape(num_embeddings, embedding_dim, QuantFormat.parse(fmt), group_size)
        if packed.dtype != torch.uint8 or tuple(packed.shape) != (num_embeddings, self.shape.row_bytes):
            raise UsageError(
                f"packed {self.shape.fmt.label} embedding {num_embeddings}x{embedding_dim} must be "
                f"uint8 of shape ({num_embeddings}, {self.shape.row_bytes}), got "
                f"{packed.dtype} {tuple(packed.shape)}"
            )
        self.register_buffer("packed", aligned(packed))

    @classmethod
    def from_linear(cls, head: QuantLinear) -> QuantEmbedding:
        """The embedding tied to ``head``: the same packed tensor, not a copy."""
        return cls(head.out_features, head.in_features, head.fmt, head.packed, head.group_size)

    @property
    def num_embeddings(self) -> int:
        return self.shape.out_features

    @property
    def embedding_dim(self) -> int:
        return self.shape.in_features

    @property
    def nbytes(self) -> int:
        return self.packed.numel()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(..., ) token ids -> (..., embedding_dim) float32."""
        if ids.dtype not in (torch.int64, torch.int32) or ids.numel() and (
                int(ids.min()) < 0 or int(ids.max()) >= self.shape.out_features):
            raise UsageError(f"token ids must be integers in [0, {self.shape.out_features})")
        return dequantize_rows(self.packed, self.shape.fmt, ids, self.shape.in_features,
                               self.shape.group_size)

    def extra_repr(self) -> str:
        return f"{self.shape.out_features}, {self.shape.in_features}, fmt={self.shape.fmt.label}"
