"""Prompt lookup: the draft is what followed the latest earlier occurrence of the last n tokens.

No model and no weights: input-grounded replies (summaries that quote, edits of a given text or
code, answers that repeat the question) reuse long runs of the conversation, and each such run is
verified k tokens per round trip.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .base import Draft

if TYPE_CHECKING:
    import torch

    from ..sampling import SamplingSettings


class NgramDrafter:
    """Proposes the continuation of the latest earlier match of the context's last n tokens,
    trying n = ``max_ngram`` down to 1 (a longer match predicts better; a shorter one more often)."""

    cost = 0.0

    def __init__(self, max_ngram: int = 3) -> None:
        self.max_ngram = max_ngram
        self.name = "ngram" if max_ngram == 3 else f"ngram:{max_ngram}"

    def propose(
        self, context: Sequence[int], k: int, sampling: SamplingSettings, generator: torch.Generator
    ) -> Draft:
        t0 = time.perf_counter()
        return Draft(lookup(context, k, self.max_ngram), None, time.perf_counter() - t0)

    def close(self) -> None:
        pass


def lookup(context: Sequence[int], k: int, max_ngram: int) -> list[int]:
    """Up to ``k`` tokens that followed the latest earlier occurrence of the last n tokens of
    ``context`` (the longest n from ``max_ngram`` down to 1 that occurs); ``[]`` when none does."""
    ids = list(context)
    end = len(ids)
    if k < 1:
        return []
    for n in range(min(max_ngram, end - 1), 0, -1):
        tail = ids[end - n :]
        first = tail[0]
        # latest first: scan starts backwards from the last start that is not the tail itself
        for i in range(end - n - 1, -1, -1):
            if ids[i] == first and ids[i : i + n] == tail:
                return ids[i + n : i + n + k]
    return []
