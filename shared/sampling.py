"""Choosing the next token from logits: greedy, temperature, top-k, top-p, seeded."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import UsageError


@dataclass(frozen=True)
class SamplingSettings:
    """How the next token is chosen.

    Attributes:
        temperature: 0 is greedy (argmax, as transformers' ``generate`` with ``do_sample=False``);
            above 0 divides the logits before sampling.
        top_k: keep the k most likely tokens (0 keeps all).
        top_p: keep the smallest set whose probability reaches p (1.0 keeps all).
        seed: seed of the sampler's own generator (None: a random seed).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise UsageError(f"--temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise UsageError(f"--top-k must be >= 0 (0 keeps all tokens), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise UsageError(f"--top-p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Sampler:
    """Picks tokens for one generation; owns its random generator so runs are reproducible."""

    def __init__(self, settings: SamplingSettings) -> None:
        self.settings = settings
        self.generator = torch.Generator()
        if settings.seed is not None:
            self.generator.manual_seed(settings.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor) -> int:
        """The next token id from the last position's logits ``(V,)``."""
        if self.settings.greedy:
            return int(torch.argmax(logits.to(torch.float32)))
        return self.draw(self.distribution(logits))

    def distribution(self, logits: torch.Tensor) -> torch.Tensor:
        """The probabilities ``(V,)`` float32 a sampled token is drawn from: the logits after
        temperature, top-k and top-p (not meaningful for greedy settings)."""
        s = self.settings
        logits = logits.to(torch.float32) / s.temperature
        if s.top_k and s.top_k < logits.numel():
            kth = torch.topk(logits, s.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if s.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            # drop a token when the tokens before it already reach top_p (the first always stays)
            drop = (torch.cumsum(probs, dim=-1) - probs) >= s.top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
        return torch.softmax(logits, dim=-1)

    def draw(self, probs: torch.Tensor) -> int:
        """A token drawn from ``probs`` ``(V,)`` with this sampler's generator."""
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def uniform(self) -> float:
        """A number in [0, 1) from this sampler's generator (speculative sampling's coin)."""
        return float(torch.rand((), generator=self.generator))
