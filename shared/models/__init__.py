"""Model families and model sources. A new family is one adapter file plus its entry here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import UnsupportedModel
from . import precision  # noqa: F401  first: quiets torchao's import before transformers imports it
from .base import (
    Family,
    Part,
    PartChain,
    PartSpec,
    build_part,
    build_parts,
    resolve_device,
    resolve_dtype,
)
from .gemma import GemmaFamily
from .gpt2 import GPT2Family
from .llama import LlamaFamily
from .source import ModelSource, resolve

if TYPE_CHECKING:
    from transformers import PretrainedConfig

FAMILIES: tuple[Family, ...] = (GPT2Family(), LlamaFamily(), GemmaFamily())


def family_for(config: PretrainedConfig) -> Family:
    """The adapter for a config's ``model_type``.

    Raises:
        UnsupportedModel: no adapter runs this architecture.
    """
    for fam in FAMILIES:
        if config.model_type in fam.model_types:
            return fam
    known = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise UnsupportedModel(f"model type {config.model_type!r} is not supported; splitlm runs: {known}")


__all__ = [
    "FAMILIES",
    "Family",
    "ModelSource",
    "Part",
    "PartChain",
    "PartSpec",
    "build_part",
    "build_parts",
    "family_for",
    "resolve",
    "resolve_device",
    "resolve_dtype",
]
