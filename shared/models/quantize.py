"""Putting quantised weights into a part: from float weights (``--weights int8|int4``) or from a
GGUF file's own blocks (``--weights gguf``).

What a part owns is swapped module by module, so the family adapters run unchanged:

- every ``nn.Linear`` of its decoder layers (GPT-2's ``Conv1D`` first becomes the equal
  ``nn.Linear``) becomes a ``QuantLinear``;
- with the head, the LM head becomes a ``QuantLinear`` (8-bit under int4 too:
  ``precision.HEAD_FORMAT_OF``); a tied embedding becomes a ``ScaledQuantEmbedding`` over the very
  same blocks, so the client holds one quantised matrix for both (a lookup dequantises the rows it
  needs), not a float32 embedding beside a quantised head.

Norms, biases, position embeddings (GPT-2's ``wpe``), rotary tables and the cache stay in the
part's float dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from .precision import DEFAULT_GROUP_SIZE, conv1d_to_linear, decoder_layers
from .quant import QuantEmbedding, QuantLinear

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from .base import Part


class ScaledQuantEmbedding(QuantEmbedding):
    """A packed embedding in a part's dtype, scaled as the module it replaces was: Gemma's
    embedding multiplies its rows by ``embed_scale`` (sqrt(hidden)) in the model's dtype."""

    def __init__(self, table: QuantLinear, dtype: torch.dtype, embed_scale: torch.Tensor | None) -> None:
        super().__init__(table.out_features, table.in_features, table.fmt, table.packed, table.group_size)
        self.dtype = dtype
        self.embed_scale = embed_scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = super().forward(ids).to(self.dtype)  # (..., H)
        if self.embed_scale is not None:
            out = out * self.embed_scale.to(self.dtype)
        return out


def _replace(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


class QuantMaker:
    """Makes the ``QuantLinear`` of a float linear layer: from a GGUF's blocks when it has them
    (``blocks``: transformers weight name -> ``QuantLinear``), else by quantising the float weight
    into ``fmt`` (``None``: a GGUF weight left float in the file stays float).

    ``made`` remembers a tied embedding quantised by its address, so parts built together (a
    client's bottom and top, which share that tensor) share its blocks too.
    """

    def __init__(
        self,
        fmt: str | None,
        group_size: int,
        blocks: dict[str, QuantLinear],
        made: dict[int, QuantLinear],
        head_fmt: str | None = None,
    ) -> None:
        self.fmt = fmt
        self.group_size = group_size
        self.blocks = blocks
        self.made = made
        self.head_fmt: str | None = head_fmt or fmt

    def __call__(self, weight_name: str, mod: nn.Linear, end: bool = False) -> nn.Module:
        """The module for ``mod``; ``end``: it is the LM head or the embedding, quantised into
        ``head_fmt`` (at the format's own group of 32) and shared by parts built together."""
        found = self.blocks.get(weight_name)
        if found is not None:
            if mod.bias is None:
                return found
            return QuantLinear(found.in_features, found.out_features, found.fmt, found.packed, mod.bias.detach())
        if self.fmt is None:
            return mod
        if not end:
            return QuantLinear.from_float(mod.weight.detach(), mod.bias, self.fmt, self.group_size)
        # a weight the loaded state holds for the parts' life (so its address is its identity)
        key = mod.weight.data_ptr()
        if key not in self.made:
            fmt = self.head_fmt or self.fmt
            group = self.group_size if fmt == self.fmt else DEFAULT_GROUP_SIZE
            self.made[key] = QuantLinear.from_float(mod.weight.detach(), mod.bias, fmt, group)
        return self.made[key]


def quantize_parts(
    parts: list[Part],
    fmt: str | None,
    group_size: int,
    blocks: dict[str, QuantLinear] | None = None,
    head_fmt: str | None = None,
) -> list[int]:
    """Quantise what each part owns (see the module's docstring); returns the count of quantised
    products per part.

    Args:
        fmt: the block format for float weights (``q8_0``, ``q4_1``...); ``None`` with a GGUF's
            ``blocks``: weights the file holds as floats stay float.
        blocks: a GGUF's quantised weights by transformers name, already in their formats.
        head_fmt: the LM head's (and a tied embedding's) format, when not ``fmt``.
    """
    make = QuantMaker(fmt, group_size, blocks or {}, {}, head_fmt)
    return [_quantize(part, make) for part in parts]


def _quantize(part: Part, make: QuantMaker) -> int:
    model = part.model
    layers = decoder_layers(model)
    prefix = part.family.layer_prefix
    n = 0
    for i in range(part.spec.start, part.spec.end):
        conv1d_to_linear(layers[i])
        for name, mod in list(layers[i].named_modules()):
            if isinstance(mod, nn.Linear):
                q = make(f"{prefix}{i}.{name}.weight", mod)
                if q is not mod:
                    _replace(layers[i], name, q)
                    n += 1
    return n + _quantize_ends(part, make)


def _quantize_ends(part: Part, make: QuantMaker) -> int:
    """The LM head of a part that has it, and the embedding when it is the head's matrix (tied)
    or when a GGUF holds it quantised: the full model and the split's bottom then look up the
    same quantised rows."""
    model = cast("PreTrainedModel", part.model)
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    emb_name = part.family.embed_names[0]
    tied = bool(getattr(part.config, "tie_word_embeddings", False))
    n = 0
    table: nn.Module | None = None
    if part.spec.head and isinstance(head, nn.Linear):
        table = make(emb_name if tied else part.family.lm_head_name, head, end=True)
        if table is not head:
            model.set_output_embeddings(table)
            n += 1
    if tied and isinstance(table, QuantLinear) and isinstance(emb, nn.Embedding):
        # the top holds the embedding only as its head: the float matrix goes either way
        model.set_input_embeddings(ScaledQuantEmbedding(table, part.dtype, getattr(emb, "embed_scale", None)))
    elif part.spec.embed and isinstance(emb, nn.Embedding):
        if not isinstance(table, QuantLinear) or not tied:
            as_linear = nn.Linear(emb.embedding_dim, emb.num_embeddings, bias=False, device="meta")
            as_linear.weight = emb.weight
            table = make(emb_name, as_linear, end=True) if (tied or emb_name in make.blocks) else None
        if isinstance(table, QuantLinear):
            model.set_input_embeddings(ScaledQuantEmbedding(table, part.dtype, getattr(emb, "embed_scale", None)))
    return n


def quantized_count(model: nn.Module) -> int:
    """How many products of ``model`` run quantised (a tied head and embedding count once)."""
    return sum(isinstance(m, QuantLinear) for m in model.modules())
