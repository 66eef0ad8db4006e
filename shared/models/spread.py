"""A trunk cut over several devices: one ``Part`` per device, run one after another as one part.

``splitlm-trunkd --devices cuda:0,cuda:1`` (or ``cpu,cpu``) cuts its trunk range into contiguous
sub-ranges by the plan's strategy (``shared.partition``), one per device. Each sub-range is a
``Part`` built on its device (only its own weights are read there), and ``SpreadPart`` runs them
in order: the hidden states move from one device to the next between sub-ranges, the way they
cross the wire between the client and a daemon (the next part casts them to its own dtype).

The cache is one ``PartCache`` for the whole trunk range, as for a single part: the daemon's
budget, rollback, ``plan`` and byte counts work on it unchanged. Its layer ``i`` allocates its
buffers on the device its keys come from (``new_empty`` of the key states), so the KV cache of
each sub-range lives on that sub-range's device. Running a sub-range narrows the cache to its
layers (``layer_range``), exactly as the daemon's prefill slices do: each layer computes what it
computes in one part, so tokens stay exact (``tests/daemon/test_devices.py``).

CUDA: written as torch documents it (``Tensor.to(device)`` between devices, each part's weights
and rotary buffers on its device); not run here, where no GPU was available.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack

import torch

from ..cache import PartCache, layer_range
from .base import Part, PartSpec
from .rows import RowsCache, rows_attention_for


class SpreadPart(Part):
    """Trunk layers cut over devices: ``parts`` in layer order, each on its own device.

    It is a ``Part`` to the daemon (``new_cache``, ``forward``, ``forward_rows``, ``begin_step``,
    ``run_span``); ``device`` is the first part's (where hidden states enter), ``dtype`` the
    last one's (what leaves). Not thread-safe, as a ``Part``: one thread runs its steps.

    Raises:
        ValueError: parts that are not contiguous trunk parts of one model.
    """

    def __init__(self, parts: Sequence[Part]) -> None:
        if len(parts) < 2:
            raise ValueError("a spread part has two parts or more")
        for a, b in zip(parts, parts[1:]):
            if a.spec.end != b.spec.start:
                raise ValueError(f"parts {a.spec.start}:{a.spec.end} and {b.spec.start}:{b.spec.end} do not follow each other")
        if any(p.spec.embed or p.spec.head for p in parts):
            raise ValueError("only trunk layers are spread over devices")
        first, last = parts[0], parts[-1]
        spec = PartSpec.trunk(first.spec.start, last.spec.end)
        super().__init__(first.source, first.family, spec, first.model, first.config, last.dtype, first.device)
        self.parts = list(parts)

    @property
    def placement(self) -> list[tuple[str, int, int]]:
        """``(device, start, end)`` of each sub-range, in layer order."""
        return [(str(p.device), p.spec.start, p.spec.end) for p in self.parts]

    def new_cache(self) -> PartCache:
        return PartCache(self.config, self.spec.start, self.spec.end)

    def run_span(self, h: torch.Tensor, position: int, cache: PartCache, start: int, end: int) -> torch.Tensor:
        """Layers ``[start, end)`` over ``h`` ``(1, t, H)``, each on its part's device; the
        cache's length is left to the caller."""
        for p in self.parts:
            a, b = max(start, p.spec.start), min(end, p.spec.end)
            if a < b:
                h = p.run_span(h, position, cache, a, b)
        return h

    @torch.inference_mode()
    def forward(
        self,
        x: torch.Tensor,
        position: int,
        cache: PartCache,
        max_context: int | None = None,
        logits_for: int = 1,
    ) -> torch.Tensor:
        """``Part.forward`` through each device's layers in turn; the output is on the last
        part's device (``(1, t, H)``)."""
        self.begin_step(x, position, cache, max_context)
        h = self.run_span(x, position, cache, self.spec.start, self.spec.end)
        cache.length = position + int(x.shape[1])
        return h

    @torch.inference_mode()
    def forward_rows(
        self, xs: Sequence[torch.Tensor], positions: Sequence[int], caches: Sequence[PartCache]
    ) -> list[torch.Tensor]:
        """``Part.forward_rows`` through each device's layers in turn (each row's cache is
        narrowed to the part's layers while it runs)."""
        if any(x.shape[1] != 1 for x in xs):
            from ..errors import InvalidStep

            raise InvalidStep("a batch runs one-position steps only")
        h = torch.cat(list(xs), dim=0)  # (B, 1, H)
        for p in self.parts:
            h = h.to(device=p.device, dtype=p.dtype)
            position_ids = torch.tensor([[q] for q in positions], device=p.device)  # (B, 1)
            with ExitStack() as stack:
                for c in caches:
                    stack.enter_context(layer_range(c, p.spec.start, p.spec.end))
                with rows_attention_for(p.model) as own:
                    h = p.family.run_layers(p.model, h, position_ids, RowsCache(caches, own))
        for position, cache in zip(positions, caches):
            cache.length = position + 1
        return list(torch.split(h, 1, dim=0))  # B x (1, 1, H)
