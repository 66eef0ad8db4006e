"""Latency figures of a reply and of a full-vs-split comparison. Pure: tested without a UI.

Each token's latency is split three ways: own-machine compute (bottom, top, sampling: the shared
loop's ``client_s``), trunk compute (``trunk_s``, reported by the daemon per step) and wire (the
rest: serialisation, the socket, gRPC, scheduling). The first token's latency is the TTFT.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ...shared.generation import GenerationResult, TokenEvent


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (as ``splitlm compare`` computes it); NaN for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


@dataclass(frozen=True)
class TokenTiming:
    """One token's latency and where it went, in seconds."""

    latency_s: float
    own_s: float
    trunk_s: float

    @property
    def wire_s(self) -> float:
        return max(0.0, self.latency_s - self.own_s - self.trunk_s)

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


@dataclass(frozen=True)
class Agreement:
    """How two token sequences agree.

    Attributes:
        matching_prefix: leading tokens that are equal.
        identical: both sequences are the same.
        first_difference: index of the first differing token (None when identical).
    """

    matching_prefix: int
    identical: bool
    first_difference: int | None
    full_tokens: int
    split_tokens: int

    @classmethod
    def of(cls, full: Sequence[int], split: Sequence[int]) -> Agreement:
        n = 0
        for a, b in zip(full, split):
            if a != b:
                break
            n += 1
        same = list(full) == list(split)
        return cls(n, same, None if same else n, len(full), len(split))

    @property
    def percent(self) -> float:
        """Share of positions where the two agree, over the longer sequence."""
        longest = max(self.full_tokens, self.split_tokens)
        return 100.0 if longest == 0 else 100.0 * self.matching_prefix / longest


def ratio(a: float, b: float) -> float:
    """``a / b``, NaN when either is missing or ``b`` is zero."""
    if b == 0 or math.isnan(a) or math.isnan(b):
        return math.nan
    return a / b


def fmt_ms(seconds: float, digits: int = 1) -> str:
    return "—" if math.isnan(seconds) else f"{seconds * 1e3:.{digits}f} ms"


def fmt_rate(per_s: float) -> str:
    return "—" if math.isnan(per_s) else f"{per_s:.1f} tok/s"


def fmt_ratio(x: float) -> str:
    return "—" if math.isnan(x) else f"{x:.2f}×"


def fmt_bytes(n: float) -> str:
    if math.isnan(n):
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def fmt_share(part: float, whole: float) -> str:
    return "—" if math.isnan(part) or not whole or math.isnan(whole) else f"{100 * part / whole:.0f}%"
