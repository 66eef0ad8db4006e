"""How many tokens to draft next: an adaptive length and a pause when drafting does not pay.

The length grows by 2 after a draft was accepted whole and shrinks by 1 after a rejection
(transformers' assisted generation does the same), within ``[1, draft_max]``. Whether to draft
at all comes from a cost model: with a per-token acceptance ``a`` a draft of k tokens gives
``(1 - a**(k + 1)) / (1 - a)`` tokens for one step that costs ``1 + link + VERIFY_STEP +
k * (VERIFY_COST + drafter.cost)`` where a plain step costs ``1 + link`` (in units of one decode
step's compute;
``link`` is the round trip's share: 0 for the full model, ~0.7 for SmolLM2 across a 50 ms link).
When no k pays by ``MARGIN``, drafting pauses for a while (doubling up to ``MAX_PAUSE`` steps)
and then probes again with one token.

Within a reply the decisions follow the accepted tokens alone (``link`` is fixed when the reply
starts, never re-read from the clock), so the full model and the split, given the same logits
and the same ``link``, draft and verify the same chunks and their greedy tokens compare bit for
bit (``compare`` gives both sides the split's ``link``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

VERIFY_STEP = 0.3
"""Compute of leaving one-position steps, relative to one: a one-row product (MKL's gemv) streams
each weight once; a product of 2+ rows (oneDNN's, ``shared.models.small_rows``) costs more, most
of it whatever the rows. SmolLM2's full model, CPU ms per step of t positions
(``scripts/verify_cost.py``): 1 thread t=1 60, t=2 78, t=3 82, t=5 90, t=9 105; 2 threads 63, 87,
89, 97, 111 (MKL's own multi-row products, before: 1.5-1.7x at t=2, 1.9-2.4x at t=9)."""

VERIFY_COST = 0.06
"""Compute of each verified position beyond that, relative to a one-position step (the same
curve: 0.066 at one thread, 0.056 at two)."""

MARGIN = 0.05
"""A draft must promise 5 % more tokens per unit of compute than plain decoding: the rest of
the 5 % budget the issue gives a draft at zero link delay covers the estimate's error."""

PRIOR_ACCEPTANCE = 0.6
"""The acceptance assumed before any draft was verified (weight of ``PRIOR_WEIGHT`` tokens)."""

PRIOR_WEIGHT = 2.0
DECAY = 0.9
"""Per verified draft, older evidence is weighted down by this much (about the last 10 drafts)."""

START_LENGTH = 4
MAX_PAUSE = 64
PROBE_BUDGET = 0.03
"""At most this share of a paused reply's time goes to probes that find drafting still does not
pay: with the 5 % budget a draft has at zero link delay, the rest covers the first decision."""


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens one verification of a k-token draft yields when each draft token is accepted with
    probability ``acceptance`` independently until the first rejection (the bonus token counts)."""
    a = min(max(acceptance, 0.0), 0.999999)
    return (1.0 - a ** (k + 1)) / (1.0 - a)


def step_cost(k: int, draft_cost: float, link: float = 0.0) -> float:
    """Time of a step verifying k drafted tokens, drafting and the round trip included, in
    one-position steps of compute."""
    if k == 0:
        return 1.0 + link
    return 1.0 + link + VERIFY_STEP + k * (VERIFY_COST + draft_cost)


@dataclass
class DraftControl:
    """The draft length for one reply (fresh per reply: acceptance differs per prompt).

    Attributes:
        draft_max: the longest draft (``--draft-max``).
        draft_cost: the drafter's ``cost``.
        link: the round trip beside a step's compute, as a multiple of it (fixed per reply).
    """

    draft_max: int
    draft_cost: float = 0.0
    link: float = 0.0
    length: int = 0
    accepted_w: float = PRIOR_ACCEPTANCE * PRIOR_WEIGHT
    tried_w: float = PRIOR_WEIGHT
    pause_left: int = 0
    pause_next: int = 1
    probing: bool = False

    def __post_init__(self) -> None:
        self.length = min(START_LENGTH, self.draft_max)

    @property
    def acceptance(self) -> float:
        """The running estimate of the per-token acceptance."""
        return self.accepted_w / self.tried_w

    def best_length(self) -> int:
        """The k in ``[1, length]`` with the most tokens per unit of compute; 0 when none pays."""
        best_k, best_gain = 0, 1.0 + MARGIN
        for k in range(1, self.length + 1):
            gain = expected_tokens(self.acceptance, k) * (1.0 + self.link) / step_cost(k, self.draft_cost, self.link)
            if gain > best_gain:
                best_k, best_gain = k, gain
        return best_k

    def next_length(self, room: int) -> int:
        """How many tokens to draft for the next step; ``room`` is how many tokens the reply may
        still take after the step's own (never draft past ``max_new_tokens``)."""
        if room < 1:
            return 0
        if self.pause_left > 0:
            self.pause_left -= 1
            if self.pause_left == 0:
                self.probing = True
            return 0
        if self.probing:
            return 1
        k = self.best_length()
        if k == 0:
            self.pause_left = max(self.pause_next, self.shortest_pause())
            self.pause_next = min(MAX_PAUSE, self.pause_left * 2)
            return 0
        return min(k, room)

    def shortest_pause(self) -> int:
        """Steps between two probes so that probing costs at most ``PROBE_BUDGET`` of the time: a
        one-token probe that is rejected costs ``step_cost(1) - step_cost(0)`` (0.73 of a step for
        SmolLM2's distilled bridge next to the model: a pause of 25 steps)."""
        extra = step_cost(1, self.draft_cost, self.link) - step_cost(0, self.draft_cost, self.link)
        return max(1, math.ceil(extra / ((1.0 + self.link) * PROBE_BUDGET)))

    def verified(self, proposed: int, accepted: int) -> None:
        """Record a verified draft: ``accepted`` of ``proposed`` tokens kept."""
        if proposed == 0:
            return
        tried = accepted + (0 if accepted == proposed else 1)
        self.accepted_w = DECAY * self.accepted_w + accepted
        self.tried_w = DECAY * self.tried_w + tried
        if accepted == proposed:
            self.length = min(self.draft_max, self.length + 2)
        else:
            self.length = max(1, self.length - 1)
        if self.probing:
            self.probing = False
            if self.best_length() > 0:
                self.pause_next = 1
