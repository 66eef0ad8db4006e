"""The KV cache of one part of a model: rollback, bounded sliding windows, bytes known before a step.

transformers' own ``DynamicCache`` cannot roll a sliding-window layer back once it has dropped the
tokens outside its window. Here sliding-window layers keep their window plus ``ROLLBACK_DEPTH``
positions of history, while they *return* exactly what transformers' ``DynamicSlidingWindowLayer``
returns (the last ``W - 1`` cached positions plus the new ones) and report the same mask sizes, so a
part computes bit for bit what the full model computes and a session can go back (regenerate,
edit, a speculative verify) to any position at or above ``PartCache.rollback_floor``. Below it,
``truncate`` raises ``RollbackTooDeep`` and the caller re-prefills from position 0 (a step at 0
is always possible: nothing before it is needed). Full-attention layers keep their whole history.

Keys and values live in preallocated buffers (``_Buffers``): a decode step writes one position in
place instead of concatenating the whole history (O(1), not O(context)). A buffer's first
allocation is exactly what its first step needs; later ones double (by at most
``GROW_MAX_STEP``), so copies amortise to O(1) per position. A sliding layer's buffer stops growing
at ``W - 1 + ROLLBACK_DEPTH`` plus a quarter of that; when it is full, the positions still kept
move to its front (one copy of the kept positions every quarter-window of steps: O(1) per step).

The daemon's byte budget reserves before a buffer grows: ``PartCache.plan`` says, before a step
runs, how many bytes its buffers will add, squeezing the slack to fit the bytes left, and the
step then grows by no more than that (``allocated_bytes`` counts the buffers' storage).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers.cache_utils import (
    Cache,
    CacheLayerMixin,
    DummyLayer,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    LinearAttentionCacheLayerMixin,
    get_layer_types_and_kwargs,
)
from transformers.configuration_utils import PreTrainedConfig

from .errors import PositionError

GROW_MIN = 8
"""Positions a buffer grows by at least once it exists (its first allocation is exact)."""
GROW_MAX_STEP = 1024
"""Capacity doubles on growth, but by at most this many positions: a buffer holds at most
``min(used, GROW_MAX_STEP)`` positions more than it uses, and past that the copies on growth stay
under one per 1024 steps."""
ROLLBACK_DEPTH = 256
"""Positions a sliding-window layer keeps beyond its window, so a session can step again from up
to this many positions back (a speculative verify, a regenerated reply of ~250 tokens) without
a re-prefill. Memory per sliding layer is bounded by ``1.25 x (W - 1 + ROLLBACK_DEPTH)`` positions."""


class RollbackTooDeep(PositionError):
    """A step rolls back further than a sliding-window layer kept: re-prefill from position 0."""


def grown_capacity(capacity: int, needed: int) -> int:
    """The next capacity of a buffer that holds ``capacity`` positions and must hold ``needed``:
    exactly ``needed`` for a new buffer (a prefill gets what it needs, no slack), else doubled (at
    least ``GROW_MIN``, at most ``GROW_MAX_STEP`` more), never less than needed."""
    if capacity == 0:
        return needed
    return max(needed, capacity + min(max(capacity, GROW_MIN), GROW_MAX_STEP))


@dataclass(frozen=True)
class Growth:
    """What a step will add to a cache's buffers, planned before it runs (``PartCache.plan``).

    Attributes:
        needed: bytes the step cannot run without (its positions, no slack).
        planned: bytes it will allocate: ``needed`` plus the slack that fit.
    """

    needed: int
    planned: int


class _Buffers:
    """Keys and values of the kept positions ``[_first, _end)``, stored in preallocated buffers.

    ``keys``/``values`` are views ``[..., :_end - _first, :]`` of buffers ``(B, kvh, capacity, hd)``,
    so a decode step writes its one position in place (O(1) per step; transformers'
    concatenation copies the whole history, O(context)). ``truncate`` only moves the end (a
    rollback is free). ``_grant`` caps the capacity of the next growth (the daemon's budget).
    """

    keys: torch.Tensor | None
    values: torch.Tensor | None
    _kbuf: torch.Tensor | None = None
    _vbuf: torch.Tensor | None = None
    _first = 0
    _end = 0
    _floor_first = 0
    _grant: int | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self._kbuf = self._vbuf = None
        self._first = self._end = self._floor_first = 0
        super().lazy_initialization(key_states, value_states)  # type: ignore[misc]

    @property
    def capacity(self) -> int:
        return 0 if self._kbuf is None else int(self._kbuf.shape[-2])

    def allocated_bytes(self) -> int:
        """Bytes of storage the buffers hold (what the allocator really gave them)."""
        if self._kbuf is None or self._vbuf is None:
            return 0
        return int(self._kbuf.untyped_storage().nbytes() + self._vbuf.untyped_storage().nbytes())

    def _keep_limit(self) -> int | None:
        """Positions kept at most (None: all of them)."""
        return None

    def _max_capacity(self) -> int | None:
        return None

    def _kept_from(self, end: int, first: int) -> int:
        """The first position kept when ``[first, end)`` does not fit the buffer."""
        limit = self._keep_limit()
        return first if limit is None else max(first, end - limit)

    def _capacities(self, n: int, t: int) -> tuple[int, int]:
        """(needed, preferred) capacity after appending ``t`` positions at ``n``; both equal the
        current capacity when the step fits the buffer as it is."""
        cap, end = self.capacity, n + t
        first = 0 if n == 0 else self._first  # a step at 0 starts the buffer again
        if cap and end - first <= cap:
            return cap, cap
        needed = end - self._kept_from(end, first)
        if cap and needed <= cap:
            return cap, cap  # compaction in place
        preferred = grown_capacity(cap, needed)
        top = self._max_capacity()
        if top is not None:
            preferred = max(needed, min(preferred, top))
        return needed, preferred

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        n, t = self._end, key_states.shape[-2]
        end = n + t
        grant, self._grant = self._grant, None
        kbuf, vbuf, first = self._kbuf, self._vbuf, self._first
        if kbuf is None or vbuf is None or end - first > kbuf.shape[-2]:
            start = self._kept_from(end, first)  # the first position kept after this step
            needed, cap = self._capacities(n, t)
            if kbuf is not None and vbuf is not None and end - start <= kbuf.shape[-2]:
                new_k, new_v = kbuf, vbuf  # full: the kept positions move to the front
            else:
                if grant is not None:
                    cap = max(needed, min(cap, grant))
                b, kvh, _, hd = key_states.shape  # (B, kvh, t, hd)
                new_k = key_states.new_empty((b, kvh, cap, hd))  # (B, kvh, capacity, hd)
                new_v = value_states.new_empty((b, kvh, cap, value_states.shape[-1]))
            if kbuf is not None and vbuf is not None and start < n:
                old_k = kbuf.narrow(2, start - first, n - start)  # (B, kvh, n - start, hd)
                old_v = vbuf.narrow(2, start - first, n - start)
                if new_k is kbuf:  # source and destination overlap: copy out first
                    old_k, old_v = old_k.clone(), old_v.clone()
                new_k.narrow(2, 0, n - start).copy_(old_k)
                new_v.narrow(2, 0, n - start).copy_(old_v)
            self._kbuf, self._vbuf = kbuf, vbuf = new_k, new_v
            self._first = first = start
        skip = max(0, first - n)  # a prefill longer than what is kept writes only its tail
        # narrow, not [..., a:b, :]: the same view at a third of the Python cost (per layer, per step)
        kbuf.narrow(2, n + skip - first, t - skip).copy_(key_states.narrow(2, skip, t - skip))
        vbuf.narrow(2, n + skip - first, t - skip).copy_(value_states.narrow(2, skip, t - skip))
        # what rollbacks may count on: as if the buffer compacted on every step, so the floor depends
        # only on the steps' positions (the same in the daemon and on the client), not on when a
        # buffer of this size happened to compact (at or before this start: kept)
        limit = self._keep_limit()
        if limit is not None:
            self._floor_first = max(self._floor_first, end - limit)
        self._set_length(end)

    def _set_length(self, length: int) -> None:
        assert self._kbuf is not None and self._vbuf is not None
        self._end = length
        self.keys = self._kbuf.narrow(2, 0, length - self._first)  # (B, kvh, kept, hd), a view
        self.values = self._vbuf.narrow(2, 0, length - self._first)

    def rollback_floor(self) -> int:
        """The lowest length but 0 that ``truncate`` accepts (0, a re-prefill, always works)."""
        return 0

    def truncate(self, length: int) -> None:
        """Keep positions ``[0, length)``; never frees the buffers (a rollback is free).

        Raises:
            RollbackTooDeep: ``length`` is above 0 and below ``rollback_floor()``; nothing changed.
        """
        floor = self.rollback_floor()
        if length == 0:
            self._first = self._floor_first = 0  # a new start: nothing before it is needed
        elif length < floor:
            raise RollbackTooDeep(
                f"cannot roll back to position {length}: sliding-window layers keep only the last "
                f"{getattr(self, 'rollback_depth', ROLLBACK_DEPTH)} positions beyond their window, so the lowest position to step "
                f"from is {floor}; re-prefill from position 0"
            )
        if self.is_initialized and self.keys is not None and self._end > length:  # type: ignore[attr-defined]
            self._set_length(length)


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


class SlidingLayer(_Buffers, DynamicSlidingWindowLayer):
    """A sliding-window layer cache that keeps its window plus ``rollback_depth`` positions.

    Args:
        sliding_window: ``W``: a position attends to itself and the ``W - 1`` before it.
        rollback_depth: positions kept beyond the window, for rollbacks.
    """

    def __init__(self, sliding_window: int, rollback_depth: int = ROLLBACK_DEPTH, **kwargs: object) -> None:
        super().__init__(sliding_window=sliding_window, **kwargs)
        self.rollback_depth = rollback_depth

    def _keep_limit(self) -> int:
        return self.sliding_window - 1 + self.rollback_depth

    def _max_capacity(self) -> int:
        keep = self._keep_limit()
        return keep + max(GROW_MIN, keep // 4)

    def rollback_floor(self) -> int:
        # stepping from p needs positions [p - W + 1, p): all of them kept
        return 0 if self._floor_first == 0 else self._floor_first + self.sliding_window - 1

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        window = self.sliding_window - 1
        n, t = self._end, key_states.shape[-2]
        if n <= window and n + t <= self._keep_limit():
            # nothing dropped: the buffers' view is exactly what transformers' layer returns
            self._append(key_states, value_states)
            assert self.keys is not None and self.values is not None
            visible_k, visible_v = self.keys, self.values
        else:  # what transformers' layer returns: its last W - 1 positions, then the new ones
            seen = min(n, window)
            visible_k, visible_v = key_states, value_states
            if seen:
                assert self.keys is not None and self.values is not None
                visible_k = torch.cat([self.keys[..., -seen:, :], key_states], dim=-2)  # (B, kvh, seen+t, hd)
                visible_v = torch.cat([self.values[..., -seen:, :], value_states], dim=-2)
            self._append(key_states, value_states)
        self.cumulative_length = n + t
        return visible_k, visible_v

    def truncate(self, length: int) -> None:
        super().truncate(length)
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
    ``length`` is the number of positions cached; ``truncate`` rolls back to an earlier one, at
    or above ``rollback_floor``.

    Args:
        rollback_depth: positions a sliding-window layer keeps beyond its window.
    """

    def __init__(
        self, config: PreTrainedConfig, start: int, end: int, rollback_depth: int = ROLLBACK_DEPTH
    ) -> None:
        types, kwargs = get_layer_types_and_kwargs(config)
        # typed as Cache.__init__ takes it (a list of any of transformers' layer kinds)
        layers: list[CacheLayerMixin | LinearAttentionCacheLayerMixin | DummyLayer] = []
        for i, (kind, kw) in enumerate(zip(types, kwargs)):
            cls = _LAYER_CLASSES.get(kind)
            if cls is None:
                raise ValueError(f"layer {i} has attention type {kind!r}, which splitlm does not support")
            if not start <= i < end:
                # transformers leaves DynamicLayer.__init__ (FullLayer's) unannotated
                layers.append(FullLayer())  # type: ignore[no-untyped-call]
            elif cls is SlidingLayer:
                layers.append(SlidingLayer(rollback_depth=rollback_depth, **kw))
            else:
                layers.append(cls(**kw))
        super().__init__(layers=layers)
        self._own_layers = tuple(layer for layer in layers[start:end] if isinstance(layer, _Buffers))
        self.types = list(types)
        self.start = start
        self.end = end
        self.length = 0

    def _own(self) -> tuple[_Buffers, ...]:
        """The layers of this part (found once at construction: every step walks them)."""
        return self._own_layers

    @property
    def rollback_floor(self) -> int:
        """The lowest position a step may start from, but 0; below it, re-prefill from 0."""
        return max((layer.rollback_floor() for layer in self._own()), default=0)

    def truncate(self, length: int) -> None:
        """Roll the cache back so it holds positions ``[0, length)``.

        Raises:
            PositionError: ``length`` is beyond what is cached.
            RollbackTooDeep: ``length`` is above 0 and below ``rollback_floor``; nothing changed.
        """
        if length > self.length:
            raise PositionError(f"cannot roll back to position {length}: only {self.length} are cached")
        if length == self.length:
            return
        own = self._own()
        for layer in own:  # every layer accepts before any one changes
            if 0 < length < layer.rollback_floor():
                layer.truncate(length)  # raises RollbackTooDeep
        for layer in own:
            layer.truncate(length)
        self.length = length

    def plan(self, position: int, t: int, position_bytes: int, limit: int | None = None) -> Growth:
        """What a step over ``[position, position + t)`` will add to the buffers, before it runs.

        When the usual slack does not fit ``limit`` bytes but the step's own positions do, the
        growing buffers share, as slack, half of what is left beyond those positions (so one
        session does not take all that is left, and near the limit growth becomes exact); the
        step then grows by exactly ``planned`` bytes (on any thread, as long as no other step runs
        on this cache in between).

        Args:
            position: where the step starts, at most ``length`` and at least ``rollback_floor``.
            position_bytes: keys and values of one position in one layer, in bytes.
            limit: bytes the growth may take (the budget left); None for no limit.
        """
        growing = []
        for layer in self._own():
            layer._grant = None
            needed, preferred = layer._capacities(position, t)
            if preferred > layer.capacity:
                growing.append((layer, needed, preferred))
        cap = sum(layer.capacity for layer, _, _ in growing)
        need = (sum(n for _, n, _ in growing) - cap) * position_bytes
        want = (sum(p for _, _, p in growing) - cap) * position_bytes
        if limit is None or want <= limit or need > limit:
            return Growth(need, want if limit is None or want <= limit else need)
        extra = (limit - need) // 2 // (position_bytes * len(growing))  # slack positions per buffer
        planned = 0
        for layer, n, p in growing:
            layer._grant = min(p, n + extra)
            planned += (layer._grant - layer.capacity) * position_bytes
        return Growth(need, planned)

    def allocated_bytes(self) -> int:
        """Bytes of storage this cache's buffers hold: what the allocator gave, slack included."""
        return sum(layer.allocated_bytes() for layer in self._own())

    def nbytes(self) -> int:
        """Bytes of the positions kept (at most ``allocated_bytes``)."""
        total = 0
        for layer in self._own():
            if layer.is_initialized and layer.keys is not None:  # type: ignore[attr-defined]
                total += layer.keys.numel() * layer.keys.element_size() * 2
        return total


@contextmanager
def layer_range(cache: PartCache, start: int, end: int) -> Iterator[PartCache]:
    """``cache`` as the cache of layers ``[start, end)`` only, for one ``Family.run_layers``
    call (the families loop over ``range(cache.start, cache.end)``): a prefill slice of the
    daemon, or one device's layers of a trunk spread over devices. The caller owns the cache for
    the call: no other step touches it meanwhile."""
    was = cache.start, cache.end
    cache.start, cache.end = start, end
    try:
        yield cache
    finally:
        cache.start, cache.end = was
