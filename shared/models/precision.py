"""Weight precision of a part: ``float32``, ``bfloat16`` or ``int8`` (``--weights``).

``--weights`` is the one knob for how weights are stored and computed with:

- ``float32``, ``bfloat16``: weights and compute in that dtype (``--dtype`` must agree or be
  ``auto``).
- ``int8``: the ``nn.Linear`` layers of the decoder layers a part owns get int8 weights (one scale
  per output channel, torchao's weight-only int8); activations and compute stay float32, and so
  does everything else (embeddings, norms, the LM head) and the hidden states between parts.
  CPU only (on a GPU use ``bfloat16``).
- unset (``auto``): the weights follow ``--dtype``, as before ``--weights`` existed.

The quantisation of a layer depends only on its own weights, so the trunk quantised in the
daemon equals the same layers quantised inside the full model: split equals full at the same
precision. The precision is part of the fingerprint; float32 adds nothing to it, so fingerprints
of float32 parts are what they were.

Chosen by measurement (``scripts/int8_ab.py``: SmolLM2 one-token steps, 2-core CPU shared with
other jobs, variants interleaved step by step, medians): torch's ``quantize_dynamic`` ran at
0.54x float32's step time, torchao 0.18's int8 weight-only at 0.83x and its dynamic int8 config at
1.8x (no ``torch.compile``). But dynamic quantisation also rounds every activation to int8 (one
scale per tensor): on SmolLM2 its greedy replies left float32's within a few tokens and ran past
the end of the turn, while weight-only int8 kept most replies token-identical. Weight-only wins.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..config import WEIGHT_PRECISIONS
from ..errors import UsageError

if TYPE_CHECKING:
    from .base import Part

log = logging.getLogger(__name__)

WEIGHTS = WEIGHT_PRECISIONS
"""The values of ``--weights`` (besides ``auto``), as the settings registry declares them."""

_FLOAT = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Precision:
    """How a part's weights are stored and what dtype it computes in.

    Attributes:
        weights: ``float32``, ``bfloat16``, ``float16`` (only through ``--dtype``) or ``int8``.
        dtype: the compute dtype, which is also the dtype of the hidden states a part returns.
    """

    weights: str
    dtype: torch.dtype

    @property
    def quantized(self) -> bool:
        return self.weights == "int8"

    @property
    def tag(self) -> str:
        """What the fingerprint and the plan carry: ``float32``, ``bfloat16``, ``int8``..."""
        return self.weights


def resolve_precision(weights: str | None, dtype: torch.dtype, dtype_explicit: bool, device: torch.device) -> Precision:
    """The precision for ``--weights`` given the ``--dtype`` already resolved.

    Args:
        weights: ``--weights``; ``None`` or ``auto``: the weights follow ``dtype``.
        dtype: ``--dtype`` resolved (``auto`` already turned into a dtype).
        dtype_explicit: ``--dtype`` was set to something other than ``auto``.

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
    if weights == "int8" and device.type != "cpu":
        raise UsageError(f"--weights int8 runs on the CPU only; use --weights bfloat16 on {device}")
    return Precision(weights, want)


def quantize_layers(model: nn.Module, layers: nn.ModuleList, start: int, end: int) -> int:
    """Quantise the ``nn.Linear`` (and GPT-2 ``Conv1D``) layers of ``layers[start:end]`` to int8.

    Weight-only int8 through torchao (``Int8WeightOnlyConfig``: one scale per output channel,
    activations stay in the compute dtype). The weights are replaced in place inside ``model``;
    returns how many layers were quantised.

    Raises:
        UsageError: torchao is not installed (``pip install 'splitlm[int8]'``).
    """
    quantize_, config = _torchao_int8()
    count = 0
    for i in range(start, end):
        _conv1d_to_linear(layers[i])
        n = sum(isinstance(m, nn.Linear) for m in layers[i].modules())
        if n:
            quantize_(layers[i], config)
        count += n
    return count


def int8_linear_count(model: nn.Module) -> int:
    """How many ``nn.Linear`` layers of ``model`` hold int8 weights (for logs and tests)."""
    return sum(
        isinstance(m, nn.Linear) and type(m.weight).__name__ == "Int8Tensor" for m in model.modules()
    )


_IMPORT_NOISE = ("torchao", "torch.utils._pytree")
"""Loggers that warn while torchao imports (CUDA kernels it cannot load on a CPU build, Triton
absent, enums torch now registers itself): noise on every CLI's stderr, nothing to act on."""


def quiet_torchao_import() -> None:
    """Silence torchao's import-time warnings. transformers imports torchao whenever it is
    installed, so this runs before splitlm first imports transformers (``models/__init__``)."""
    for name in _IMPORT_NOISE:
        logging.getLogger(name).setLevel(logging.ERROR)


quiet_torchao_import()


def _torchao_int8() -> tuple[Callable[[nn.Module, object], None], object]:
    """torchao's ``quantize_`` and its int8 weight-only config."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as e:
        raise UsageError(f"--weights int8 needs torchao ({e}): pip install 'splitlm[int8]'") from None
    return quantize_, Int8WeightOnlyConfig()


def _conv1d_to_linear(block: nn.Module) -> None:
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


def apply_precision(parts: list[Part], precision: Precision) -> None:
    """Quantise the decoder layers each part owns when ``precision`` is int8 (else nothing).

    Parts must have been built with ``precision.dtype``.
    """
    if not precision.quantized:
        return
    for part in parts:
        if part.dtype != precision.dtype:
            raise ValueError(f"the {part.spec.name} computes in {part.dtype}, not {precision.dtype}")
        n = quantize_layers(part.model, decoder_layers(part.model), part.spec.start, part.spec.end)
        log.info("%s [%d, %d): %d linear layers in int8", part.spec.name, part.spec.start, part.spec.end, n)


def precision_named(tag: str, device: torch.device) -> Precision:
    """The precision a plan names (``Plan.weights``, empty: float32; ``float16`` too)."""
    tag = tag or "float32"
    if tag == "float16":
        return Precision(tag, torch.float16)
    return resolve_precision(tag, torch.float32, False, device)


def client_weights(weights: str | None, dtype: str | None) -> str | None:
    """What a client asks for: ``--weights``, else an explicit ``--dtype``, else None (the
    daemon's precision, or float32 for a full model on the CPU)."""
    if weights not in (None, "auto"):
        return weights
    if dtype not in (None, "auto"):
        return dtype
    return None
