"""The server view shows the real daemon's monitor stream."""

from __future__ import annotations

from splitlm.tui.app.app import SplitlmApp
from splitlm.tui.app.widgets.figures import Figures
from splitlm.tui.app.widgets.monitor_panel import MonitorPanel
from tests.tui.conftest import wait_until


async def test_monitor_panel_shows_a_sample(chat_daemon, make_config) -> None:  # type: ignore[no-untyped-def]
    app = SplitlmApp(make_config(chat_daemon.address, monitor_interval_s=0.25))
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("ctrl+t")
        await wait_until(pilot, lambda: app.screen.id == "server-screen", what="the server screen")
        panel = app.screen.query_one(MonitorPanel)
        figures = panel.query_one("#monitor-figures", Figures)
        await wait_until(pilot, lambda: app.monitor_samples >= 2 and figures.value("CPU") is not None,
                         timeout=30, what="two samples")
        s = app.monitor.latest
        assert s.mem_total_bytes > 0 and s.daemon_rss_bytes > 0
        assert figures.value("CPU").startswith(f"{s.cpu_percent:.0f}%")
        assert "GiB" in figures.value("memory")
        gpu = panel.query_one("#monitor-gpus")
        await wait_until(pilot, lambda: bool(gpu.query(".gpu-status")), what="the GPU line")
        assert "NVIDIA" in str(gpu.query_one(".gpu-status").render())  # no GPU here: the reason
        assert app.connection == "connected"
    assert app._feed is not None and app._feed._stop.is_set()  # unmount cancelled the stream
