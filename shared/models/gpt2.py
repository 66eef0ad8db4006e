"""GPT-2: learned position embeddings, pre-norm blocks, ``ln_f``, head tied to ``wte``.

Default plan for the 12-layer GPT-2: ``2:10``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask

from ..cache import PartCache
from .base import Family, submodule
from .rows import RowsCache, per_row


class GPT2Family(Family):
    name: ClassVar[str] = "gpt2"
    model_types: ClassVar[tuple[str, ...]] = ("gpt2",)
    embed_names: ClassVar[tuple[str, ...]] = ("transformer.wte.weight", "transformer.wpe.weight")
    layer_prefix: ClassVar[str] = "transformer.h."
    head_names: ClassVar[tuple[str, ...]] = ("transformer.ln_f.weight", "transformer.ln_f.bias", "lm_head.weight")

    def embed(self, model: nn.Module, ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        body = submodule(model, "transformer")
        h = submodule(body, "wte")(ids) + submodule(body, "wpe")(position_ids)  # (1, t, H)
        out: torch.Tensor = submodule(body, "drop")(h)
        return out

    def run_layers(
        self, model: nn.Module, h: torch.Tensor, position_ids: torch.Tensor, cache: PartCache | RowsCache
    ) -> torch.Tensor:
        body = submodule(model, "transformer")
        mask = per_row(  # a batch of rows (RowsCache) gets the list of each row's own mask
            create_causal_mask, cache, h, position_ids, config=body.config, attention_mask=None,
            layer_idx=cache.start,
        )
        for i in range(cache.start, cache.end):
            h = submodule(body, f"h.{i}")(h, cache, mask, None, encoder_attention_mask=None, use_cache=True, position_ids=position_ids)
        return h

    def head(self, model: nn.Module, h: torch.Tensor) -> torch.Tensor:
        h = submodule(model, "transformer.ln_f")(h)
        logits: torch.Tensor = submodule(model, "lm_head")(h)  # (1, t, V)
        return logits
