"""Timeline of a reply: each token's latency split into own machine, trunk and wire (stacked)."""

from __future__ import annotations

from collections.abc import Sequence

from textual_plotext import PlotextPlot

from ..stats import TokenTiming


class LatencyTimeline(PlotextPlot):
    """One stacked bar per token (ms): own-machine compute, trunk compute, wire."""

    MAX_BARS = 200
    """Later tokens beyond this are left out: bars one cell wide stop being readable."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.timings: list[TokenTiming] = []

    def on_mount(self) -> None:
        super().on_mount()
        self.draw()

    def show(self, timings: Sequence[TokenTiming]) -> None:
        self.timings = list(timings)
        self.draw()

    def draw(self) -> None:
        plt = self.plt
        plt.clear_figure()
        plt.title("each token (ms): own · trunk · wire")
        t = self.timings[: self.MAX_BARS]
        if t:
            x = list(range(len(t)))
            # plotext's stacked_bar takes labels=; textual_plotext's copy of its signature says label=
            plt.stacked_bar(
                x,
                [[s.own_s * 1e3 for s in t], [s.trunk_s * 1e3 for s in t], [s.wire_s * 1e3 for s in t]],
                labels=["own", "trunk", "wire"],  # type: ignore[call-arg]
                width=1,
            )
            step = max(1, len(t) // 6)
            plt.xticks(list(range(0, len(t), step)))  # explicit: plotext's own choice drifts
        plt.xlabel("token")
        self.refresh()
