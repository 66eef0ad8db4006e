"""Tensors to and from the wire: raw little-endian bytes with dtype and shape.

Encoding takes one copy (the contiguous tensor's buffer into the message); decoding none: the
tensor is a view of the message's bytes. Every length and shape is checked before use, so a
malformed message is an ``InvalidStep``, never a crash.
"""

from __future__ import annotations

import math
import sys
import warnings

import numpy as np
import torch

from ..protos import trunk_pb2 as pb
from .errors import InvalidStep

TORCH_OF: dict[pb.DType, torch.dtype] = {
    pb.FLOAT32: torch.float32,
    pb.FLOAT16: torch.float16,
    pb.BFLOAT16: torch.bfloat16,
}
PB_OF: dict[torch.dtype, pb.DType] = {v: k for k, v in TORCH_OF.items()}
NAMES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ITEMSIZE: dict[torch.dtype, int] = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}

# ``decode`` hands torch a read-only view of the message's bytes (never written: the tensor is
# only read); torch's once-per-process warning about that would reach the CLI's stderr.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", module=__name__)

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
    raise ImportError("splitlm's wire format assumes a little-endian host")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def encode(t: torch.Tensor, dtype: torch.dtype | None = None, out: pb.Tensor | None = None) -> pb.Tensor:
    """A tensor as a ``splitlm.v1.Tensor`` (cast to ``dtype`` first when given)."""
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    t = t.detach().to("cpu").contiguous()
    msg = out if out is not None else pb.Tensor()
    msg.dtype = PB_OF[t.dtype]
    msg.shape[:] = t.shape
    msg.data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return msg


def decode(msg: pb.Tensor) -> torch.Tensor:
    """A ``splitlm.v1.Tensor`` as a tensor viewing the message's bytes.

    Raises:
        InvalidStep: unknown dtype, or byte length different from shape x itemsize.
    """
    dtype = TORCH_OF.get(msg.dtype)
    if dtype is None:
        raise InvalidStep(f"tensor dtype {msg.dtype} is not one of float32, float16, bfloat16")
    shape = tuple(msg.shape)
    want = math.prod(shape) * ITEMSIZE[dtype]
    data = msg.data  # each read of a bytes field makes a new bytes object: read it once
    if len(data) != want:
        raise InvalidStep(
            f"tensor of shape {shape} and dtype {dtype_name(dtype)} needs {want} bytes, got {len(data)}"
        )
    if want == 0:  # a zero in the shape: other dimensions may still be absurd (2**32 - 1, ...)
        try:
            return torch.empty(shape, dtype=dtype)
        except RuntimeError:
            raise InvalidStep(f"tensor shape {shape} is not a valid shape") from None
    # a view, no copy: numpy's frombuffer costs ~1 us where torch.frombuffer's warning costs ~7
    flat = torch.from_numpy(np.frombuffer(data, dtype=np.uint8))
    return flat.view(dtype).view(shape)
