"""Which drafted tokens the served model keeps: the greedy rule and speculative sampling.

Greedy keeps the longest prefix of the draft equal to the model's argmax at each position and
then takes the model's own token: exactly the tokens plain greedy decoding picks from the same
logits. Sampling uses the standard rule (Leviathan et al. 2023; Chen et al. 2023): a drafted
token x drawn from q is kept with probability ``min(1, p(x) / q(x))``; at the first rejection the
token is drawn from ``max(0, p - q)`` renormalised; after a draft kept whole the bonus token is
drawn from p. Every emitted token is then distributed as plain sampling from p would give it. A
deterministic draft (prompt lookup, a greedy draft model) is the point mass q(x) = 1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..sampling import Sampler
    from .base import Draft


def verify(logits: torch.Tensor, draft: Draft, sampler: Sampler) -> tuple[list[int], int]:
    """The tokens a verification step yields, and how many of them are drafted tokens kept.

    Args:
        logits: ``(len(draft.tokens) + 1, V)``: row i is the model's next-token logits after the
            context and the first i drafted tokens.
        draft: the proposal that was verified.
        sampler: the reply's sampler (its settings and generator).

    Returns:
        ``(tokens, accepted)``: the kept drafted tokens followed by one token of the model's own
        (a correction or the bonus), so ``len(tokens) == accepted + 1``.
    """
    drafted = draft.tokens
    if sampler.settings.greedy:
        choice = torch.argmax(logits.to(torch.float32), dim=-1).tolist()  # (k + 1,)
        n = 0
        while n < len(drafted) and drafted[n] == choice[n]:
            n += 1
        return [*drafted[:n], int(choice[n])], n
    for i, x in enumerate(drafted):
        p = sampler.distribution(logits[i])
        q_x = 1.0 if draft.probs is None else float(draft.probs[i, x])
        p_x = float(p[x])
        if q_x > 0 and sampler.uniform() < min(1.0, p_x / q_x):
            continue
        if draft.probs is None:
            residual = p.clone()
            residual[x] = 0.0
        else:
            residual = torch.clamp(p - draft.probs[i].to(p.dtype), min=0.0)
        if float(residual.sum()) <= 0.0:  # p == q to rounding: any draw from p is right
            residual = p
        return [*drafted[:i], sampler.draw(residual / residual.sum())], i
    return [*drafted, sampler.draw(sampler.distribution(logits[len(drafted)]))], len(drafted)
