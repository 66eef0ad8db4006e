"""The KV cache of one part of a model, with rollback to any earlier position.

transformers' own ``DynamicCache`` cannot roll a sliding-window layer back once it has dropped the
tokens outside its window. Here every layer keeps its whole history, while sliding-window layers
*return* exactly what transformers' ``DynamicSlidingWindowLayer`` returns (the last ``W - 1`` cached
positions plus the new ones, as a fresh contiguous tensor) and report the same mask sizes, so a
part computes bit for bit what the full model computes, and a session can still go back to any
position (regenerate, edit, replay).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import (
    Cache,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    get_layer_types_and_kwargs,
)
from transformers.configuration_utils import PreTrainedConfig

from .errors import PositionError


class FullLayer(DynamicLayer):
    """A full-attention layer cache that can be truncated to an absolute length."""

    def truncate(self, length: int) -> None:
        if self.is_initialized and self.keys is not None and self.keys.shape[-2] > length:
            self.keys = self.keys[..., :length, :]  # (B, kvh, length, hd)
            self.values = self.values[..., :length, :]


class SlidingLayer(DynamicSlidingWindowLayer):
    """A sliding-window layer cache that keeps all history so it can be rolled back."""

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keep = self.sliding_window - 1
        # what transformers' layer would return: its kept window, then the new positions
        if self.keys.dim() == 4 and self.keys.shape[-2] > keep:
            visible_k = torch.cat([self.keys[..., -keep:, :], key_states], dim=-2)  # (B, kvh, W-1+t, hd)
            visible_v = torch.cat([self.values[..., -keep:, :], value_states], dim=-2)
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
        else:
            self.keys = visible_k = torch.cat([self.keys, key_states], dim=-2)
            self.values = visible_v = torch.cat([self.values, value_states], dim=-2)
        self.cumulative_length += key_states.shape[-2]
        return visible_k, visible_v

    def truncate(self, length: int) -> None:
        if self.is_initialized and self.keys is not None and self.keys.shape[-2] > length:
            self.keys = self.keys[..., :length, :]
            self.values = self.values[..., :length, :]
        self.cumulative_length = min(self.cumulative_length, length)


_LAYER_CLASSES: dict[str, type[DynamicLayer]] = {
    "full_attention": FullLayer,
    "sliding_attention": SlidingLayer,
    "chunked_attention": SlidingLayer,
}


def layer_types(config: PreTrainedConfig) -> list[str]:
    """Each decoder layer's attention type, as transformers' own cache sees it."""
    types, _ = get_layer_types_and_kwargs(config)
    return list(types)


class PartCache(Cache):
    """The KV cache of the layers ``[start, end)`` of one model, indexed by original layer index.

    Layers outside the part keep an empty slot, so each layer module keeps its own ``layer_idx``.
    ``length`` is the number of positions cached; ``truncate`` rolls back to an earlier one.
    """

    def __init__(self, config: PreTrainedConfig, start: int, end: int) -> None:
        types, kwargs = get_layer_types_and_kwargs(config)
        layers: list[DynamicLayer] = []
        for i, (kind, kw) in enumerate(zip(types, kwargs)):
            cls = _LAYER_CLASSES.get(kind)
            if cls is None:
                raise ValueError(f"layer {i} has attention type {kind!r}, which splitlm does not support")
            layers.append(cls(**kw) if start <= i < end else FullLayer())
        super().__init__(layers=layers)
        self.types = list(types)
        self.start = start
        self.end = end
        self.length = 0

    def truncate(self, length: int) -> None:
        """Roll the cache back so it holds positions ``[0, length)``.

        Raises:
            PositionError: ``length`` is beyond what is cached.
        """
        if length > self.length:
            raise PositionError(f"cannot roll back to position {length}: only {self.length} are cached")
        if length == self.length:
            return
        for i in range(self.start, self.end):
            layer = self.layers[i]
            assert isinstance(layer, (FullLayer, SlidingLayer))
            layer.truncate(length)
        self.length = length

    def nbytes(self) -> int:
        """Bytes held by the cached keys and values."""
        total = 0
        for i in range(self.start, self.end):
            layer = self.layers[i]
            if layer.is_initialized and layer.keys is not None:
                total += layer.keys.numel() * layer.keys.element_size() * 2
        return total
