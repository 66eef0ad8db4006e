"""LatencyStrip: records as tokens come, draws on refresh."""

from __future__ import annotations

from textual.app import App, ComposeResult
from textual.widgets import Sparkline

from splitlm.tui.app.widgets.latency_strip import LatencyStrip


class Host(App[None]):
    def compose(self) -> ComposeResult:
        yield LatencyStrip()


async def test_records_then_draws() -> None:
    app = Host()
    async with app.run_test(size=(100, 5)):
        strip = app.query_one(LatencyStrip)
        assert strip.figures() == "idle"
        strip.record(0, 0.2)
        for i in range(1, 5):
            strip.record(i, 0.05)
        assert strip.query_one(Sparkline).data == []  # nothing drawn until the refresh
        strip.refresh_figures()
        assert strip.query_one(Sparkline).data == [50.0] * 4
        assert strip.figures() == "5 tok · 20.0 tok/s · TTFT 200 ms · p50 50.0 ms"
        strip.reset()
        assert strip.figures() == "idle" and strip.query_one(Sparkline).data == []
