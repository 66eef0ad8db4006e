"""The Gemma family: Gemma, Gemma 2, Gemma 3 (text).

What differs from Llama: the embedding is scaled by sqrt(hidden) (inside transformers' scaled
embedding module), Gemma 2 and 3 interleave sliding-window and global layers (each layer keeps its
original index and type, so a slice gets the right mask and cache), Gemma 3 has one rotary table
per layer type, and Gemma 2 and 3 soft-cap the final logits.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from .base import submodule
from .decoder import RotaryDecoderFamily


class GemmaFamily(RotaryDecoderFamily):
    name: ClassVar[str] = "gemma"
    model_types: ClassVar[tuple[str, ...]] = ("gemma", "gemma2", "gemma3_text")

    def rotary(
        self, body: nn.Module, h: torch.Tensor, position_ids: torch.Tensor, types: set[str]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if getattr(body.config, "model_type", None) == "gemma3_text":
            rotary_emb = submodule(body, "rotary_emb")
            return {t: rotary_emb(h, position_ids, t) for t in types}
        return super().rotary(body, h, position_ids, types)

    def head(self, model: nn.Module, h: torch.Tensor) -> torch.Tensor:
        logits = super().head(model, h)
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits
