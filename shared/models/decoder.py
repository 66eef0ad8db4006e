"""The recipe shared by rotary decoder stacks (Llama and Gemma families): ``model.model`` holds
``embed_tokens``, ``layers``, ``norm`` and ``rotary_emb``; ``model.lm_head`` is the head.

It follows ``LlamaModel.forward``: embed, position ids from the cached length, one mask per
attention type (made by transformers' own mask functions from this part's cache), rotary
embeddings computed once and shared, the layer loop, the norm.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from ..cache import PartCache
from .base import Family, submodule
from .rows import RowsCache, per_row

_MASKS = {
    "full_attention": create_causal_mask,
    "sliding_attention": create_sliding_window_causal_mask,
    "chunked_attention": create_sliding_window_causal_mask,
}


class RotaryDecoderFamily(Family):
    embed_names: ClassVar[tuple[str, ...]] = ("model.embed_tokens.weight",)
    layer_prefix: ClassVar[str] = "model.layers."
    head_names: ClassVar[tuple[str, ...]] = ("model.norm.weight", "lm_head.weight")

    def embed(self, model: nn.Module, ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        h: torch.Tensor = submodule(model, "model.embed_tokens")(ids)  # (1, t, H); Gemma's scales inside
        return h

    def rotary(
        self, body: nn.Module, h: torch.Tensor, position_ids: torch.Tensor, types: set[str]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(cos, sin) per attention type; one rotary table unless the family has several."""
        pe = submodule(body, "rotary_emb")(h, position_ids)
        return {t: pe for t in types}

    def run_layers(
        self, model: nn.Module, h: torch.Tensor, position_ids: torch.Tensor, cache: PartCache | RowsCache
    ) -> torch.Tensor:
        body = submodule(model, "model")
        config = body.config
        types = cache.types
        first: dict[str, int] = {}
        for i in range(cache.start, cache.end):
            first.setdefault(types[i], i)
        # a batch of rows (RowsCache) gets, per type, the list of the masks each row gets alone
        masks = {
            t: per_row(_MASKS[t], cache, h, position_ids, config=config, attention_mask=None, layer_idx=i)
            for t, i in first.items()
        }
        rope = self.rotary(body, h, position_ids, set(first))
        for i in range(cache.start, cache.end):
            h = submodule(body, f"layers.{i}")(
                h,
                attention_mask=masks[types[i]],
                position_embeddings=rope[types[i]],
                position_ids=position_ids,
                cache=cache,
                use_cache=True,
            )
        return h

    def head(self, model: nn.Module, h: torch.Tensor) -> torch.Tensor:
        h = submodule(model, "model.norm")(h)
        logits: torch.Tensor = submodule(model, "lm_head")(h)  # (1, t, V)
        return logits
