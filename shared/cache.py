"""The KV cache of one part of a model, with rollback to any earlier position.

transformers' own ``DynamicCache`` cannot roll a sliding-window layer back once it has dropped the
tokens outside its window. Here every layer keeps its whole history, while sliding-window layers
*return* exactly what transformers' ``DynamicSlidingWindowLayer`` returns (the last ``W - 1`` cached
positions plus the new ones; until the window is full, a view of the buffers) and report the same
mask sizes, so a part computes bit for bit what the full model computes, and a session can still
go back to any position (regenerate, edit, replay).

Keys and values live in preallocated buffers that grow by doubling (``_Buffers``): a decode step
writes one position in place instead of concatenating the whole history (O(1), not O(context)).
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

GROW_MIN = 256
"""Positions allocated at least when a layer's buffer grows."""
GROW_MAX_STEP = 1024
"""Capacity doubles on growth, but by at most this many positions: a buffer holds at most
``min(used, GROW_MAX_STEP)`` positions more than it uses (the daemon's memory budget counts
used positions), and past that the copies on growth stay under one per 1024 steps."""


def grown_capacity(capacity: int, needed: int) -> int:
    """The next capacity of a buffer that holds ``capacity`` positions and must hold ``needed``:
    doubled (at least ``GROW_MIN``, at most ``GROW_MAX_STEP`` more), never less than needed."""
    return max(needed, GROW_MIN, capacity + min(max(capacity, GROW_MIN), GROW_MAX_STEP))


class _Buffers:
    """Keys and values of all cached positions, stored in preallocated buffers.

    ``keys``/``values`` are views ``[..., :length, :]`` of buffers ``(B, kvh, capacity, hd)``, so a
    decode step writes its one position in place (O(1) per step; transformers' concatenation
    copies the whole history, O(context)). A buffer grows by doubling, so the copies amortise to
    O(1) per position; ``truncate`` only moves the end (a rollback is free).
    """

    keys: torch.Tensor | None
    values: torch.Tensor | None
    _kbuf: torch.Tensor | None = None
    _vbuf: torch.Tensor | None = None
    _stored = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self._kbuf = self._vbuf = None
        self._stored = 0
        super().lazy_initialization(key_states, value_states)  # type: ignore[misc]

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        n, t = self._stored, key_states.shape[-2]
        kbuf, vbuf = self._kbuf, self._vbuf
        if kbuf is None or vbuf is None or kbuf.shape[-2] < n + t or kbuf.shape[:2] != key_states.shape[:2]:
            cap = grown_capacity(0 if kbuf is None else kbuf.shape[-2], n + t)
            b, kvh, _, hd = key_states.shape  # (B, kvh, t, hd)
            new_k = key_states.new_empty((b, kvh, cap, hd))  # (B, kvh, capacity, hd)
            new_v = value_states.new_empty((b, kvh, cap, value_states.shape[-1]))
            if n:
                new_k[..., :n, :].copy_(kbuf[..., :n, :])  # type: ignore[index]
                new_v[..., :n, :].copy_(vbuf[..., :n, :])  # type: ignore[index]
            self._kbuf, self._vbuf = kbuf, vbuf = new_k, new_v
        # narrow, not [..., a:b, :]: the same view at a third of the Python cost (per layer, per step)
        kbuf.narrow(2, n, t).copy_(key_states)
        vbuf.narrow(2, n, t).copy_(value_states)
        self._set_length(n + t)

    def _set_length(self, length: int) -> None:
        assert self._kbuf is not None and self._vbuf is not None
        self._stored = length
        self.keys = self._kbuf.narrow(2, 0, length)  # (B, kvh, length, hd), a view
        self.values = self._vbuf.narrow(2, 0, length)


class FullLayer(_Buffers, DynamicLayer):
    """A full-attention layer cache that can be truncated to an absolute length."""

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._append(key_states, value_states)
        assert self.keys is not None and self.values is not None
        return self.keys, self.values

    def truncate(self, length: int) -> None:
        if self.is_initialized and self.keys is not None and self._stored > length:
            self._set_length(length)


class SlidingLayer(_Buffers, DynamicSlidingWindowLayer):
    """A sliding-window layer cache that keeps all history so it can be rolled back."""

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keep = self.sliding_window - 1
        # what transformers' layer would return: its kept window, then the new positions
        if self._stored > keep:
            assert self.keys is not None and self.values is not None
            visible_k = torch.cat([self.keys[..., -keep:, :], key_states], dim=-2)  # (B, kvh, W-1+t, hd)
            visible_v = torch.cat([self.values[..., -keep:, :], value_states], dim=-2)
            self._append(key_states, value_states)
        else:
            self._append(key_states, value_states)
            assert self.keys is not None and self.values is not None
            visible_k, visible_v = self.keys, self.values
        self.cumulative_length += key_states.shape[-2]
        return visible_k, visible_v

    def truncate(self, length: int) -> None:
        if self.is_initialized and self.keys is not None and self._stored > length:
            self._set_length(length)
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
