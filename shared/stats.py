"""Latency figures, defined once for every face: the daemon's monitor ("step p50"), ``splitlm
compare``, the chat app's stats and compare views, and ``splitlm bench``.

A p50 printed by any of them means the same thing: ``percentile`` below. Pure; tested without a
model (``tests/shared/test_stats.py`` also checks that every face computes it through here).

Each token's latency splits three ways: own-machine compute (bottom, top, sampling: the
generation loop's ``client_s``), trunk compute (``trunk_s``, reported by the daemon per step) and
the rest, the split's overhead (serialisation, the socket, gRPC, scheduling). The first token's
latency is the TTFT.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .generation import GenerationResult, TokenEvent


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0-1) of ``values``, interpolating linearly between the two nearest
    ranks: numpy's default and ``statistics.quantiles(method="inclusive")``, so the median of an
    even count is the mean of the middle two. NaN for no values (a caller that must show a number
    instead, like the monitor's wire format, says so itself).

    Raises:
        ValueError: ``q`` is outside [0, 1].
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"a quantile is between 0 and 1, got {q}")
    if not values:
        return math.nan
    s = sorted(values)
    rank = q * (len(s) - 1)
    lo = int(rank)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (rank - lo)


def ratio(a: float, b: float) -> float:
    """``a / b``; NaN when either is missing (NaN) or ``b`` is zero."""
    if b == 0 or math.isnan(a) or math.isnan(b):
        return math.nan
    return a / b


@dataclass(frozen=True)
class TokenTiming:
    """One token's latency and where it went, in seconds."""

    latency_s: float
    own_s: float
    trunk_s: float

    @property
    def overhead_s(self) -> float:
        """Latency not spent computing, here or in the daemon (may dip below 0 by clock noise)."""
        return self.latency_s - self.own_s - self.trunk_s

    @property
    def wire_s(self) -> float:
        """``overhead_s`` for drawing: never negative."""
        return max(0.0, self.overhead_s)

    @classmethod
    def of(cls, event: TokenEvent) -> TokenTiming:
        return cls(event.latency_s, event.client_s, event.trunk_s)


@dataclass(frozen=True)
class ReplyStats:
    """The figures of one reply.

    Attributes:
        timings: per token, the first one's latency being the TTFT.
        bytes_moved: wire bytes both ways during the reply.
    """

    timings: tuple[TokenTiming, ...]
    bytes_moved: int = 0

    @classmethod
    def of(cls, result: GenerationResult) -> ReplyStats:
        lat = [result.ttft_s, *result.per_token_s][: len(result.token_ids)]
        timings = tuple(
            TokenTiming(latency, own, trunk)
            for latency, own, trunk in zip(lat, result.client_compute_s, result.trunk_compute_s)
        )
        return cls(timings, result.bytes_sent + result.bytes_received)

    @property
    def tokens(self) -> int:
        return len(self.timings)

    @property
    def ttft_s(self) -> float:
        return self.timings[0].latency_s if self.timings else math.nan

    @property
    def per_token_s(self) -> list[float]:
        """Latencies after the first token."""
        return [t.latency_s for t in self.timings[1:]]

    @property
    def p50_s(self) -> float:
        return percentile(self.per_token_s, 0.5)

    @property
    def p95_s(self) -> float:
        return percentile(self.per_token_s, 0.95)

    @property
    def overhead_p50_s(self) -> float:
        """Median per-token overhead after the first token (latency minus both computes)."""
        return percentile([t.overhead_s for t in self.timings[1:]], 0.5)

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: tokens after the first over their time (the TTFT is not in it)."""
        lat = self.per_token_s
        return len(lat) / sum(lat) if lat and sum(lat) > 0 else math.nan

    @property
    def bytes_per_token(self) -> float:
        return self.bytes_moved / self.tokens if self.tokens else math.nan

    @property
    def total_s(self) -> float:
        return sum(t.latency_s for t in self.timings)

    def mean_split_s(self) -> tuple[float, float, float]:
        """Mean own, trunk and wire seconds per token after the first."""
        rest = self.timings[1:]
        if not rest:
            return (math.nan, math.nan, math.nan)
        n = len(rest)
        return (
            sum(t.own_s for t in rest) / n,
            sum(t.trunk_s for t in rest) / n,
            sum(t.wire_s for t in rest) / n,
        )
