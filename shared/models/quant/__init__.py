"""Weight-only quantized linear layers for the CPU: GGUF's Q4_0, Q4_1 and Q8_0 blocks kept packed,
and the grouped Q4_1G and Q8_0G (one scale per 64, 128 or 256 weights: ``--group-size``).

``QuantLinear`` holds a packed weight and runs ``y = x @ W.T + b`` in a small C kernel
(``kernel.c``, built once per machine by ``build``) that streams the packed bytes once per call,
so a decode step reads 4.5 to 8.5 bits a weight instead of 32. ``formats`` has the byte layout,
the quantizers and a dequantizer equal to ``gguf.quants.dequantize`` bit for bit.
"""

from splitlm.shared.models.quant.build import Kernel, KernelBuildError, kernel
from splitlm.shared.models.quant.formats import (
    BLOCK,
    PackedShape,
    QuantFormat,
    dequantize,
    dequantize_rows,
    quantize,
)
from splitlm.shared.models.quant.linear import QuantEmbedding, QuantLinear, quant_linear

SUPPORTED_GGUF = tuple(f.name for f in QuantFormat if f.gguf)
"""GGUF tensor types kept quantised (``--weights gguf``): ``Q4_0``, ``Q4_1``, ``Q8_0``."""

__all__ = [
    "SUPPORTED_GGUF",
    "BLOCK",
    "Kernel",
    "KernelBuildError",
    "PackedShape",
    "QuantEmbedding",
    "QuantFormat",
    "QuantLinear",
    "dequantize",
    "dequantize_rows",
    "kernel",
    "quant_linear",
    "quantize",
]
