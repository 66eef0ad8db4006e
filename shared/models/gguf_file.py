"""A GGUF file's tensor table, read with ``struct`` instead of ``gguf.GGUFReader``.

``GGUFReader`` builds a numpy view for every part of every metadata field, a vocabulary entry
included: seconds for SmolLM2's 49k tokens and 48k merges, where loading tensors needs only the
architecture, the alignment and the table. This reader skips the values it does not need and
gives each tensor the very array ``GGUFReader`` would (same dtype, shape and bytes, a view of one
memory map), so ``gguf.dequantize`` returns the same values.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
"""GGUF metadata value types of fixed width, as ``struct`` formats (8 is a string, 9 an array)."""

_PLAIN = {"F16": np.float16, "F32": np.float32, "F64": np.float64,
          "I8": np.int8, "I16": np.int16, "I32": np.int32, "I64": np.int64}
"""Tensor types ``GGUFReader`` maps as values; every other type is handed over as raw bytes."""


@dataclass(frozen=True)
class GgufTensor:
    """One tensor: its GGUF name, ``gguf.GGMLQuantizationType`` and data (as ``GGUFReader.tensors``)."""

    name: str
    tensor_type: Any
    data: np.ndarray


@dataclass(frozen=True)
class GgufTensors:
    architecture: str
    tensors: list[GgufTensor]


class _Cursor:
    def __init__(self, blob: np.ndarray) -> None:
        self.blob = memoryview(blob)  # type: ignore[arg-type]  # a memmap is a buffer
        self.pos = 0

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        values = struct.unpack_from("<" + fmt, self.blob, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values

    def string(self) -> str:
        (n,) = self.unpack("Q")
        text = bytes(self.blob[self.pos : self.pos + n]).decode("utf-8")
        self.pos += n
        return text

    def value(self, vtype: int, keep: bool) -> Any:
        """A metadata value; arrays are skipped (None) unless ``keep``."""
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype])[0]
        if vtype == 8:
            return self.string()
        if vtype != 9:
            raise ValueError(f"unknown GGUF metadata value type {vtype}")
        etype, count = self.unpack("IQ")
        if etype in _SCALAR and not keep:
            self.pos += count * struct.calcsize("<" + _SCALAR[etype])
            return None
        if etype == 8 and not keep:  # a vocabulary: walk the lengths, decode nothing
            for _ in range(count):
                (n,) = self.unpack("Q")
                self.pos += n
            return None
        items = [self.value(etype, keep) for _ in range(count)]
        return items if keep else None


def read_tensors(path: Path) -> GgufTensors:
    """The architecture and the tensor table of a GGUF file (v2 or v3, little-endian).

    Raises:
        ValueError: not a GGUF file this reader understands.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quant_shape_to_byte_shape

    blob = np.memmap(path, mode="r", dtype=np.uint8)
    c = _Cursor(blob)
    if bytes(blob[:4]) != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (no GGUF magic)")
    c.pos = 4
    version, tensor_count, kv_count = c.unpack("IQQ")
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version} (byte-swapped or unknown) is not supported here")
    meta: dict[str, Any] = {}
    for _ in range(kv_count):
        key = c.string()
        (vtype,) = c.unpack("I")
        meta[key] = c.value(vtype, keep=False)
    infos = []
    for _ in range(tensor_count):
        name = c.string()
        (n_dims,) = c.unpack("I")
        dims = c.unpack(f"{n_dims}Q")
        ttype, offset = c.unpack("IQ")
        infos.append((name, dims, ttype, offset))
    alignment = int(meta.get("general.alignment") or 32)
    start = (c.pos + alignment - 1) // alignment * alignment
    tensors = []
    for name, dims, ttype, offset in infos:
        qtype = GGMLQuantizationType(ttype)
        n_elems = int(np.prod(dims))
        np_dims = tuple(reversed(dims))
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        at = start + offset
        plain = _PLAIN.get(qtype.name)
        if plain is not None:
            nbytes = n_elems * np.dtype(plain).itemsize
            data = blob[at : at + nbytes].view(plain).reshape(np_dims)
        else:
            nbytes = n_elems * type_size // block_size
            data = blob[at : at + nbytes].reshape(quant_shape_to_byte_shape(np_dims, qtype))
        tensors.append(GgufTensor(name, qtype, data))
    return GgufTensors(str(meta["general.architecture"]), tensors)
