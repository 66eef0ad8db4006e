"""Weight precision of a part (``--weights``): float32, bfloat16, int8, int4 or the GGUF file's own.

``--weights`` is the one knob for how weights are stored and computed with:

- ``float32``, ``bfloat16``: weights and compute in that dtype (``--dtype`` must agree or be
  ``auto``).
- ``int8``, ``int4``: the linear layers of the decoder layers a part owns, and the LM head (with a
  tied embedding, the embedding matrix itself: a lookup dequantises its rows), are quantised per
  group of ``--group-size`` weights along the input (``shared.models.quant``: int8 symmetric,
  int4 with a scale and a minimum per group). Activations, norms, the cache and the hidden
  states between parts stay float32. CPU only (on a GPU use ``bfloat16``).
- ``gguf``: a GGUF model's tensors stay in the file's own formats (Q4_0, Q4_1, Q8_0), loaded
  straight into the same kernels instead of dequantised to float32.
- unset (``auto``): the weights follow ``--dtype``, as before ``--weights`` existed.

A quantised row's product depends only on its own weights and input row (the kernels reduce each
output in a fixed order, whatever the thread count or the rows beside it), so the trunk quantised
in the daemon equals the same layers inside the full model: split equals full at the same
precision. Each part has its own precision: the client's bottom and top may run int4 next to a
float32 or bfloat16 trunk; the fingerprint carries the trunk's (float32 adds nothing to it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..config import GROUP_SIZES, WEIGHT_PRECISIONS
from ..errors import UsageError

if TYPE_CHECKING:
    from .source import ModelSource

log = logging.getLogger(__name__)

WEIGHTS = WEIGHT_PRECISIONS
"""The values of ``--weights`` (besides ``auto``), as the settings registry declares them."""

_FLOAT = {"float32": torch.float32, "bfloat16": torch.bfloat16}

QUANTIZED = ("int8", "int4", "gguf")
"""Precisions whose weights live in ``shared.models.quant`` formats; they compute in float32."""

FORMAT_OF = {"int8": "q8_0", "int4": "q4_1"}
"""The block format each quantising precision packs float weights into (``shared.models.quant``)."""

HEAD_FORMAT_OF = {"int8": "q8_0", "int4": "q8_0"}
"""The LM head's (and a tied embedding's) format: 8 bits under int4 too, as llama.cpp's 4-bit
files keep their output matrix wider. On SmolLM2 a q4_1 head left float32's greedy tokens at once
(0/10/13 of 33 agreeing on three prompts), q4_1 layers with a q8_0 head kept 33/33/33
(``scripts/quant_ab.py --agreement``)."""

DEFAULT_GROUP_SIZE = 32
"""Weights per scale (and minimum) along a row: GGUF's block, llama.cpp's choice for Q4/Q8."""


@dataclass(frozen=True)
class Precision:
    """How a part's weights are stored and what dtype it computes in.

    Attributes:
        weights: ``float32``, ``bfloat16``, ``float16`` (only through ``--dtype``), ``int8``,
            ``int4`` or ``gguf``.
        dtype: the compute dtype, which is also the dtype of the hidden states a part returns.
        group_size: weights per scale of ``int8``/``int4`` (``--group-size``); unused otherwise.
    """

    weights: str
    dtype: torch.dtype
    group_size: int = DEFAULT_GROUP_SIZE

    @property
    def quantized(self) -> bool:
        return self.weights in QUANTIZED

    @property
    def tag(self) -> str:
        """What the fingerprint and the plan carry: ``float32``, ``bfloat16``, ``int4``,
        ``int4/g128`` (a group size other than 32 changes the numbers, so it is named)..."""
        if self.weights in FORMAT_OF and self.group_size != DEFAULT_GROUP_SIZE:
            return f"{self.weights}/g{self.group_size}"
        return self.weights


def resolve_precision(
    weights: str | None,
    dtype: torch.dtype,
    dtype_explicit: bool,
    device: torch.device,
    group_size: int = DEFAULT_GROUP_SIZE,
) -> Precision:
    """The precision for ``--weights`` given the ``--dtype`` already resolved.

    Args:
        weights: ``--weights``; ``None`` or ``auto``: the weights follow ``dtype``.
        dtype: ``--dtype`` resolved (``auto`` already turned into a dtype).
        dtype_explicit: ``--dtype`` was set to something other than ``auto``.
        group_size: ``--group-size`` (int8 and int4).

    Raises:
        UsageError: ``--weights`` is unknown or contradicts ``--dtype`` or the device.
    """
    if weights in (None, "auto"):
        return Precision(str(dtype).removeprefix("torch."), dtype)
    if weights not in WEIGHTS:
        raise UsageError(f"--weights must be one of auto, {', '.join(WEIGHTS)}; got {weights!r}")
    want = _FLOAT.get(weights, torch.float32)
    if dtype_explicit and dtype != want:
        raise UsageError(
            f"--weights {weights} computes in {str(want).removeprefix('torch.')}, but --dtype says "
            f"{str(dtype).removeprefix('torch.')}: drop --dtype (--weights is the one knob)"
        )
    if weights in QUANTIZED and device.type != "cpu":
        raise UsageError(
            f"--weights {weights}: splitlm's quantised kernels run on the CPU only; use --weights "
            f"bfloat16 on {device}"
        )
    if weights == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError(f"--weights bfloat16: {device} has no bfloat16 support; use --dtype float16")
    if weights in FORMAT_OF and group_size not in GROUP_SIZES:
        raise UsageError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}; got {group_size}")
    return Precision(weights, want, group_size if weights in FORMAT_OF else DEFAULT_GROUP_SIZE)


def precision_named(tag: str, device: torch.device) -> Precision:
    """The precision a plan names (``Plan.weights``, empty: float32; ``float16`` too; ``int4/g64``)."""
    tag = tag or "float32"
    if tag == "float16":
        return Precision(tag, torch.float16)
    weights, _, group = tag.partition("/g")
    return resolve_precision(weights, torch.float32, False, device, int(group) if group else DEFAULT_GROUP_SIZE)


def check_source(precision: Precision, source: ModelSource) -> None:
    """Refuse, before any weight loads, a precision this model or machine cannot run.

    Raises:
        KernelBuildError: a quantised precision, and the kernels cannot be built here (no C
            compiler); a ``UsageError``.
        UsageError: ``gguf`` for a model that is not a GGUF file, or a GGUF whose tensors use a
            quantisation the kernels do not run (named, with the ones they do).
    """
    if precision.quantized:
        from .quant import kernel

        kernel()  # built (or found built) now: no compiler is an error before any weight loads
    if precision.weights != "gguf":
        return
    if source.kind != "gguf":
        raise UsageError(
            f"--weights gguf keeps a GGUF file's own quantisation, but {source.spec} is not a .gguf "
            "model: use --weights int4 or int8 to quantise it here"
        )
    from .gguf_file import read_tensors
    from .quant import SUPPORTED_GGUF

    types = {t.tensor_type.name for t in read_tensors(source.path).tensors}
    unsupported = sorted(types - set(SUPPORTED_GGUF) - {"F32", "F16"})
    if unsupported:
        raise UsageError(
            f"--weights gguf: {source.path.name} holds tensors in {', '.join(unsupported)}, which "
            f"splitlm cannot keep quantised (it runs {', '.join(SUPPORTED_GGUF)}, F16 and F32); "
            "use --weights float32, or int4 to requantise"
        )


def client_weights(weights: str | None, dtype: str | None) -> str | None:
    """What a client asks for: ``--weights``, else an explicit ``--dtype``, else None (the
    daemon's precision, or float32 for a full model on the CPU)."""
    if weights not in (None, "auto"):
        return weights
    if dtype not in (None, "auto"):
        return dtype
    return None


_IMPORT_NOISE = ("torchao", "torch.utils._pytree")
"""Loggers that warn while torchao imports (CUDA kernels it cannot load on a CPU build, Triton
absent, enums torch now registers itself): noise on every CLI's stderr, nothing to act on."""


def quiet_torchao_import() -> None:
    """Silence torchao's import-time warnings. transformers imports torchao whenever it is
    installed, so this runs before splitlm first imports transformers (``models/__init__``)."""
    for name in _IMPORT_NOISE:
        logging.getLogger(name).setLevel(logging.ERROR)


quiet_torchao_import()


def conv1d_to_linear(block: nn.Module) -> None:
    """GPT-2's ``Conv1D`` (``x @ W + b``, W of shape (in, out)) as the equal ``nn.Linear``."""
    from transformers.pytorch_utils import Conv1D

    for name, mod in list(block.named_modules()):
        if not isinstance(mod, Conv1D):
            continue
        n_in, n_out = mod.weight.shape
        lin = nn.Linear(n_in, n_out, bias=mod.bias is not None, device=mod.weight.device, dtype=mod.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(mod.weight.t())
            if mod.bias is not None:
                lin.bias.copy_(mod.bias)
        parent_name, _, attr = name.rpartition(".")
        setattr(block.get_submodule(parent_name) if parent_name else block, attr, lin)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a causal LM (``model.layers`` or GPT-2's ``transformer.h``)."""
    body = getattr(model, "model", None) or getattr(model, "transformer", None)
    layers = getattr(body, "layers", None) or getattr(body, "h", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"no decoder layer list found in {type(model).__name__}")
    return layers
