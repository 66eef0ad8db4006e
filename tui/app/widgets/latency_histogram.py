"""Histogram of a reply's per-token latency (Plotext through textual-plotext)."""

from __future__ import annotations

from collections.abc import Sequence

from textual_plotext import PlotextPlot


class LatencyHistogram(PlotextPlot):
    """How the per-token latencies (after the first token) of the last reply spread, in ms."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.values_ms: list[float] = []

    def on_mount(self) -> None:
        super().on_mount()
        self.draw()

    def show(self, latencies_s: Sequence[float]) -> None:
        self.values_ms = [x * 1e3 for x in latencies_s]
        self.draw()

    def draw(self) -> None:
        plt = self.plt
        plt.clear_figure()
        plt.title("per-token latency (ms)")
        if self.values_ms:
            plt.hist(self.values_ms, bins=min(30, max(5, len(self.values_ms) // 3)))
        plt.ylabel("tokens")
        self.refresh()
