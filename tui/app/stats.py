"""The chat app's latency figures: ``shared.stats`` (one percentile, one reply summary for every
face, re-exported here for the app's widgets) and how the app writes them. Pure: tested without a
UI.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...shared.stats import ReplyStats, TokenTiming, percentile, ratio

if TYPE_CHECKING:
    from ...shared.generation import GenerationResult, TokenEvent

__all__ = [
    "DraftFigures", "ReplyStats", "TokenTiming", "draft_status", "fmt_bytes", "fmt_ms", "fmt_rate", "fmt_ratio",
    "fmt_share", "percentile", "ratio",
]


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


@dataclass(frozen=True)
class DraftFigures:
    """What a draft bought in one reply so far: tokens per round trip and how many drafted tokens
    the model kept. Built from a ``TokenEvent`` while the reply streams (its counts are
    cumulative) and from the ``GenerationResult`` at the end, so the live and the final figures
    are the same numbers.

    Attributes:
        draft: the draft the reply used, in ``--draft`` spelling (``off`` for none).
        tokens: tokens generated so far.
        steps: pipeline steps (round trips to the trunk), the prefill's included.
        drafted, accepted: draft tokens proposed and kept.
    """

    draft: str
    tokens: int
    steps: int
    drafted: int
    accepted: int

    @classmethod
    def of_event(cls, draft: str, event: TokenEvent) -> DraftFigures:
        return cls(draft, event.index + 1, event.steps, event.drafted, event.accepted)

    @classmethod
    def of_result(cls, draft: str, result: GenerationResult) -> DraftFigures:
        return cls(draft, len(result.token_ids), result.steps, result.drafted, result.accepted)

    @property
    def drafting(self) -> bool:
        return self.draft != "off"

    @property
    def tokens_per_step(self) -> float:
        """Tokens per round trip (1 without a draft); NaN before the first step."""
        return ratio(self.tokens, self.steps)

    @property
    def acceptance(self) -> float:
        """Kept over drafted tokens; NaN while nothing was drafted (a paused draft, say)."""
        return ratio(self.accepted, self.drafted)

    def status(self) -> str:
        """The status bar's few words: ``draft ngram 2.4 tok/trip 78% acc``."""
        text = f"{fmt_tokens_per_step(self.tokens_per_step)} tok/trip"
        if self.drafted:
            text += f" {100 * self.acceptance:.0f}% acc"
        return f"draft {short_draft(self.draft)} {text}"

    def rows(self) -> list[tuple[str, str]]:
        """The latency screen's figures for the draft."""
        trips = f"{self.steps} ({fmt_tokens_per_step(self.tokens_per_step)} tok/trip)"
        if not self.drafting:
            return [("round trips", trips), ("draft", "off")]
        kept = f"{self.accepted} of {self.drafted} kept" if self.drafted else "nothing drafted"
        share = f"{100 * self.acceptance:.0f}%, " if self.drafted else ""
        return [("round trips", trips), ("draft", f"{short_draft(self.draft)}: {share}{kept}")]


def short_draft(draft: str) -> str:
    """A draft's kind (``model``, ``student``, ``ngram``): its path would crowd out the figures
    on an 80-column status bar (the settings screen shows it whole)."""
    kind = draft.partition(":")[0]
    return draft if kind == "ngram" else kind


def fmt_tokens_per_step(x: float) -> str:
    return "—" if math.isnan(x) else f"{x:.2f}"


def draft_status(draft: str, figures: DraftFigures | None) -> str:
    """The status bar's draft field: nothing without a draft; the chosen draft before its first
    reply; the latest reply's figures while it streams and after (when it used that draft)."""
    if draft == "off":
        return ""
    if figures is None or figures.draft != draft:
        return f"draft {short_draft(draft)}"
    return figures.status()
