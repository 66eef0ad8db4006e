"""The recipe shared by rotary decoder stacks (Llama and Gemma families): ``model.model`` holds
``embed_tokens``, ``layers``, ``norm`` and ``rotary_emb``; ``model.lm_head`` is the head.

It follows ``LlamaModel.forward``: embed, position ids from the cached length, one mask per
attention type (made by transformers' own mask functions from this part's cache), rotary
embeddings computed once and shared, the layer loop, the norm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, cast

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


@dataclass(frozen=True)
class StepInputs:
    """What every layer of one attention type gets in a step, computed once per step.

    Attributes:
        mask: the attention mask transformers' mask function made (None where sdpa needs none).
        rope: ``(cos, sin)``, each ``(B, t, hd)``.
        rope_heads: ``(cos, sin)`` unsqueezed to ``(B, 1, t, hd)`` as the attention applies them,
            with the first half of ``sin`` negated: ``rotate_half(q) * sin`` (``cat(-q2, q1) * sin``)
            is then ``q.roll(hd // 2, -1) * sin``, one op instead of four and the same bits (a
            product's sign is the product of signs, its magnitude rounds alike).
        position_ids: ``(B, t)``.
        lean: a family may run its layers' own operations without transformers' module wrappers
            (a solo cache, sdpa attention, eval mode; see ``llama.lean_layer``).
        one_row: the step is one position of one sequence (a decode step): its linear products
            are one-row products.
        fusable: products may use fused weights (``llama.FusedWeights``): no autograd records
            the step (a fused matrix spans several parameters; ``splitlm distill`` trains layers).
    """

    mask: torch.Tensor | None | list[torch.Tensor | None]
    rope: tuple[torch.Tensor, torch.Tensor]
    rope_heads: tuple[torch.Tensor, torch.Tensor]
    position_ids: torch.Tensor
    lean: bool
    one_row: bool
    fusable: bool


def _heads(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``StepInputs.rope_heads`` from ``(cos, sin)``, each ``(B, t, hd)``."""
    half = sin.shape[-1] // 2
    signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)  # (B, t, hd)
    return cos.unsqueeze(1), signed.unsqueeze(1)  # (B, 1, t, hd)


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
        attn = getattr(model.config, "_attn_implementation", None)
        lean = isinstance(cache, PartCache) and attn == "sdpa" and not model.training
        one_row = h.shape[0] * h.shape[1] == 1
        fusable = not torch.is_grad_enabled()
        steps = {
            t: StepInputs(masks[t], (cos, sin), _heads(cos, sin), position_ids, lean, one_row, fusable)
            for t, (cos, sin) in rope.items()
        }
        layers = cast(nn.ModuleList, submodule(body, "layers"))
        for i in range(cache.start, cache.end):
            h = self.run_layer(layers[i], h, steps[types[i]], cache)
        return h

    def run_layer(
        self, layer: nn.Module, h: torch.Tensor, step: StepInputs, cache: PartCache | RowsCache
    ) -> torch.Tensor:
        """One decoder layer over ``h`` ``(B, t, H)``: the layer module itself (a family may run
        the same operations leaner when ``step.lean``)."""
        out: torch.Tensor = layer(
            h,
            attention_mask=step.mask,
            position_embeddings=step.rope,
            position_ids=step.position_ids,
            cache=cache,
            use_cache=True,
        )
        return out

    def head(self, model: nn.Module, h: torch.Tensor) -> torch.Tensor:
        h = submodule(model, "model.norm")(h)
        logits: torch.Tensor = submodule(model, "lm_head")(h)  # (1, t, V)
        return logits
