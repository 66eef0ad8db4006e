"""Client parts and drafts shared by concurrent sessions of one process, one step at a time.

A ``Part`` is not thread-safe (one thread runs its steps at a time), yet several faces run many
sessions of one client at once: the bench's concurrency rows and ``splitlm generate --batch``
each give every session its own thread and its own caches over the same bottom and top. Wrapping
the parts (and each session's drafter) with one shared lock serialises the client's compute,
while the trunk steps of those sessions, made outside the lock, overlap in the daemon (which
batches them with ``--batch``): the process plays one client machine serving ``n`` sessions.

The lock is re-entrant: a drafter that runs the client's own bottom and top (a ``student:``
draft) takes it again inside ``propose``.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from .draft.base import Draft, Drafter
    from .models import Part
    from .prepare import SplitParts
    from .sampling import SamplingSettings

Lock = threading.RLock
"""The lock to share: re-entrant (see the module docstring)."""


class Serialised:
    """A part whose ``forward`` runs under a lock shared by every session of the process.

    It stands in for the ``Part`` it wraps: ``forward`` and ``new_cache`` are the part's, under
    the lock; any other attribute (``config``, ``spec``, ...) is read from the part.
    """

    def __init__(self, part: Part, lock: Any) -> None:
        self.part = part
        self.lock = lock

    def new_cache(self) -> Any:
        return self.part.new_cache()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            return self.part.forward(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.part, name)


class SerialisedDrafter:
    """A session's own drafter whose ``propose`` runs under the shared lock.

    Each session needs its own drafter instance (a drafter keeps its cache and its place in one
    reply); the lock is there because a drafter's model may share weights, or the client's
    parts, with the other sessions.
    """

    def __init__(self, drafter: Drafter, lock: Any) -> None:
        self.drafter = drafter
        self.lock = lock
        self.name = drafter.name
        self.cost = drafter.cost

    def propose(
        self, context: Sequence[int], k: int, sampling: SamplingSettings, generator: torch.Generator
    ) -> Draft:
        with self.lock:
            return self.drafter.propose(context, k, sampling, generator)

    def close(self) -> None:
        with self.lock:
            self.drafter.close()


def serialised_parts(parts: SplitParts, lock: Any) -> SplitParts:
    """``parts`` with bottom and top (and the full model, if any) serialised under ``lock``."""
    return dataclasses.replace(
        parts,
        bottom=Serialised(parts.bottom, lock),  # type: ignore[arg-type]  # stands in for a Part
        top=Serialised(parts.top, lock),  # type: ignore[arg-type]
        full=None if parts.full is None else Serialised(parts.full, lock),  # type: ignore[arg-type]
    )
