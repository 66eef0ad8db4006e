"""Several sessions' one-token steps run as one batch through the same layers.

The weight-bound work of a decode step (every linear layer, the norms, the MLP) runs once over a
``(B, 1, H)`` batch, so the weights are read once for ``B`` sessions. Attention is the one part
that depends on each session's own history: it runs row by row, each row against its own
session cache, with the mask that session would get alone. So no cache is copied or padded to
the longest one, each layer's sliding window and each family's rotary tables stay exactly those
of the solo path, and a row's new keys and values land in its own ``PartCache``.

How it plugs into transformers' layers: ``RowsCache.update`` hands the attention module a
``RowKV`` (every row's keys and values as its cache returned them) instead of one tensor, and
while the batch runs the model's attention implementation is ``splitlm_rows``, which calls the
model's own implementation (``sdpa``, ``eager``...) once per row.

Exactness: the attention of each row, its rotary table and its mask are computed exactly as
alone. The batched matrix products are not bit for bit those of one row on every CPU (a GEMM over
8 rows may sum in another order than a matrix-vector product), so a batched step agrees with the
solo step to float rounding, not always bit for bit; see the daemon's ``--batch`` option.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..cache import PartCache

log = logging.getLogger(__name__)

ROWS_IMPLEMENTATION = "splitlm_rows"


@dataclass(frozen=True)
class RowKV:
    """Every row's visible keys and values for one layer, each ``(1, kvh, L_row, hd)``."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    implementation: str
    """The model's own attention implementation, run once per row."""


class RowsCache:
    """A batch view over the ``PartCache`` of each row: layer ``i`` of row ``b`` is
    ``caches[b].layers[i]``. Only what the decoder layers call on a cache is here."""

    def __init__(self, caches: Sequence[PartCache], implementation: str) -> None:
        if not caches:
            raise ValueError("a batch has at least one row")
        self.caches = tuple(caches)
        self.implementation = implementation
        first = self.caches[0]
        self.types = first.types
        self.start = first.start
        self.end = first.end

    def __len__(self) -> int:
        return len(self.caches)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[RowKV, RowKV]:
        """Append row ``b`` of ``key_states`` ``(B, kvh, 1, hd)`` to ``caches[b]``."""
        keys, values = [], []
        for b, cache in enumerate(self.caches):
            k, v = cache.update(key_states[b : b + 1], value_states[b : b + 1], layer_idx, *args, **kwargs)
            keys.append(k)
            values.append(v)
        kv = RowKV(tuple(keys), tuple(values), self.implementation)
        return kv, kv


def rows_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: RowKV,
    value: RowKV,
    attention_mask: Sequence[torch.Tensor | None] | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention of each row against its own keys: ``query`` ``(B, heads, 1, hd)`` to
    ``(B, 1, heads, hd)``, as transformers' implementations return it."""
    if not isinstance(key, RowKV):
        raise TypeError("the splitlm_rows attention runs only inside Part.forward_rows")
    name = key.implementation
    fn: Callable[..., tuple[torch.Tensor, Any]]
    if name == "eager":
        fn = _eager_of(module)
    else:
        fn = ALL_ATTENTION_FUNCTIONS.get_interface(name, sdpa_attention_forward)
    outs = []
    for b in range(query.shape[0]):
        mask = attention_mask[b] if attention_mask is not None else None
        out, _ = fn(module, query[b : b + 1], key.keys[b], key.values[b], mask, **kwargs)
        outs.append(out)
    return torch.cat(outs, dim=0), None


def _eager_of(module: nn.Module) -> Callable[..., tuple[torch.Tensor, Any]]:
    """The eager attention of the module's own family (Gemma 2 soft-caps inside it)."""
    import sys

    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise RuntimeError(f"{type(module).__name__} has no eager attention function")
    return fn  # type: ignore[no-any-return]


@contextmanager
def rows_attention_for(model: nn.Module) -> Iterator[str]:
    """While inside, ``model``'s attention modules dispatch to ``rows_attention``; yields the
    model's own implementation. Only the thread that runs the part may use it."""
    if ROWS_IMPLEMENTATION not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(ROWS_IMPLEMENTATION, rows_attention)
    config: Any = model.config
    own = str(config._attn_implementation or "eager")
    config._attn_implementation_internal = ROWS_IMPLEMENTATION
    try:
        yield own
    finally:
        config._attn_implementation_internal = own


def per_row(
    make: Callable[..., torch.Tensor | None],
    cache: PartCache | RowsCache,
    h: torch.Tensor,
    position_ids: torch.Tensor,
    **kwargs: Any,
) -> torch.Tensor | None | list[torch.Tensor | None]:
    """``make(inputs_embeds=..., cache=..., position_ids=..., **kwargs)`` for a solo cache; for a
    ``RowsCache``, the list of what each row would get alone."""
    if isinstance(cache, RowsCache):
        return [
            make(inputs_embeds=h[b : b + 1], cache=c, position_ids=position_ids[b : b + 1], **kwargs)
            for b, c in enumerate(cache.caches)
        ]
    return make(inputs_embeds=h, cache=cache, position_ids=position_ids, **kwargs)
