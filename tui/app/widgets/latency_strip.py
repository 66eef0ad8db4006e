"""The chat's live latency line: a sparkline of per-token latency and the running figures."""

from __future__ import annotations

import math

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Label, Sparkline

from ..stats import fmt_ms, percentile


class LatencyStrip(Horizontal):
    """Per-token latency while a reply streams. Tokens are recorded as they arrive
    (``record``) and drawn on ``refresh_figures``, which the chat calls on its flush timer."""

    WINDOW = 120
    """Tokens the sparkline spans."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.ttft_s = math.nan
        self.latencies: list[float] = []
        self.tokens = 0
        self._dirty = False

    def compose(self) -> ComposeResult:
        yield Label("latency", classes="spark-name")
        yield Sparkline([], classes="spark-line")
        yield Label("idle", classes="latency-figures")

    def reset(self) -> None:
        self.ttft_s, self.latencies, self.tokens = math.nan, [], 0
        self._dirty = True
        self.refresh_figures()

    def record(self, index: int, latency_s: float) -> None:
        if index == 0:
            self.ttft_s = latency_s
        else:
            self.latencies.append(latency_s)
        self.tokens = index + 1
        self._dirty = True

    def figures(self) -> str:
        lat = self.latencies
        if not self.tokens:
            return "idle"
        rate = len(lat) / sum(lat) if lat and sum(lat) > 0 else math.nan
        parts = [f"{self.tokens} tok", "—" if math.isnan(rate) else f"{rate:.1f} tok/s",
                 f"TTFT {fmt_ms(self.ttft_s, 0)}"]
        if lat:
            parts.append(f"p50 {fmt_ms(percentile(lat, 0.5))}")
        return " · ".join(parts)

    def refresh_figures(self) -> None:
        if not self._dirty:
            return
        self._dirty = False
        self.query_one(Sparkline).data = [x * 1e3 for x in self.latencies[-self.WINDOW :]]
        self.query_one(".latency-figures", Label).update(self.figures())
