"""GPT-2: learned position embeddings, pre-norm blocks, ``ln_f``, head tied to ``wte``.

Default plan for the 12-layer GPT-2: ``2:10``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask

from ..cache import PartCache
from .base import Family
from .rows import RowsCache, per_row


class GPT2Family(Family):
    name: ClassVar[str] = "gpt2"
    model_types: ClassVar[tuple[str, ...]] = ("gpt2",)
    embed_names: ClassVar[tuple[str, ...]] = ("transformer.wte.weight", "transformer.wpe.weight")
    layer_prefix: ClassVar[str] = "transformer.h."
    head_names: ClassVar[tuple[str, ...]] = ("transformer.ln_f.weight", "transformer.ln_f.bias", "lm_head.weight")

    def embed(self, model: nn.Module, ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        body = model.transformer
        h = body.wte(ids) + body.wpe(position_ids)  # (1, t, H)
        return body.drop(h)

    def run_layers(
        self, model: nn.Module, h: torch.Tensor, position_ids: torch.Tensor, cache: PartCache | RowsCache
    ) -> torch.Tensor:
        body = model.transformer
        mask = per_row(  # a batch of rows (RowsCache) gets the list of each row's own mask
            create_causal_mask, cache, h, position_ids, config=body.config, attention_mask=None,
            layer_idx=cache.start,
        )
        for i in range(cache.start, cache.end):
            h = body.h[i](h, cache, mask, None, encoder_attention_mask=None, use_cache=True, position_ids=position_ids)
        return h

    def head(self, model: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return model.lm_head(model.transformer.ln_f(h))  # (1, t, V)
