"""The drafter protocol: what the generation loop asks of any draft."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from ..sampling import SamplingSettings


@dataclass(frozen=True)
class Draft:
    """Tokens proposed to follow a context.

    Attributes:
        tokens: the proposal, at most the ``k`` asked for (empty: nothing to propose, the loop
            takes a plain one-position step).
        probs: ``(len(tokens), V)`` float32: the distribution each token was drawn from, for the
            speculative-sampling rule; None when the tokens were chosen deterministically (prompt
            lookup, a greedy draft), which the rule treats as a point mass.
        seconds: compute spent proposing them.
    """

    tokens: list[int]
    probs: torch.Tensor | None = None
    seconds: float = 0.0


@runtime_checkable
class Drafter(Protocol):
    """Proposes tokens for one generation at a time; owns whatever cache it keeps.

    Called from the generation loop's thread only. ``propose`` is given the whole context (prompt
    and tokens so far) every time, so a drafter with a cache rolls it back to the longest common
    prefix itself: no separate "rejected" callback can get out of step.
    """

    name: str
    """How reports and the chat app name it (``ngram``, ``model:PATH``, ``student:PATH``)."""

    cost: float
    """Compute of one drafted token as a fraction of one decode step of the served model (0 for
    prompt lookup). Fixed when the drafter is built, never measured per step, so the pause rule
    decides the same way for the full model and the split and their chunks stay the same."""

    def propose(
        self, context: Sequence[int], k: int, sampling: SamplingSettings, generator: torch.Generator
    ) -> Draft:
        """Up to ``k`` tokens to follow ``context``; ``sampling``/``generator`` are the reply's
        (a drafter that samples draws with them and returns ``probs``)."""
        ...

    def close(self) -> None:
        """Free caches; the drafter may be used again afterwards (a new reply)."""
        ...


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids ``a`` and ``b`` share (how far a cache of ``a`` serves ``b``)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
