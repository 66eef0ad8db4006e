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


async def test_a_route_shows_each_daemon_and_names_the_one_that_is_lost(chat_model, make_config, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``--trunk A --trunk B`` (a chain 2:3 + 3:4): a panel per daemon, each from its own monitor
    stream; the route is connected while both are, and when one dies the connection state and
    the note name that daemon."""
    from splitlm.shared.client import TrunkClient
    from splitlm.shared.route import connect
    from tests.conftest import start_daemon

    first = start_daemon(chat_model, f"unix:{tmp_path / 'a.sock'}", tmp_path / "a.log", "--split", "2:3")
    second = start_daemon(chat_model, f"unix:{tmp_path / 'b.sock'}", tmp_path / "b.log", "--split", "3:4")
    addresses = (first.address, second.address)
    try:
        config = make_config(" -> ".join(addresses), trunks=addresses, monitor_interval_s=0.25,
                             connect=lambda: connect(addresses, TrunkClient))
        app = SplitlmApp(config, autoload=False)
        async with app.run_test(size=(100, 40)) as pilot:
            await pilot.press("ctrl+t")
            await wait_until(pilot, lambda: app.screen.id == "server-screen", what="the server screen")
            panels = list(app.screen.query(MonitorPanel))
            headings = [str(h.render()) for h in app.screen.query(".monitor-heading")]
            assert len(panels) == 2 and [a in h for a, h in zip(addresses, headings)] == [True, True], headings
            await wait_until(pilot, lambda: all(len(m.samples) >= 2 for m in app.monitors), timeout=30,
                             what="two samples from each daemon")
            for panel, history in zip(panels, app.monitors):
                figures = panel.query_one("#monitor-figures", Figures)
                await wait_until(pilot, lambda f=figures: f.value("CPU") is not None, what="a panel's figures")
                assert history.latest.daemon_rss_bytes > 0
            # two daemons, two processes: each panel shows its own daemon's memory
            assert app.monitors[0].latest.daemon_rss_bytes != app.monitors[1].latest.daemon_rss_bytes
            await wait_until(pilot, lambda: app.connection == "connected", what="the route connected")
            second.stop()
            await wait_until(pilot, lambda: app.connection in ("reconnecting", "down"), timeout=30,
                             what="the route to lose a daemon")
            assert second.address in app.monitor_note and first.address not in app.monitor_note
        assert all(f._stop.is_set() for f in app._feeds) and len(app._feeds) == 2
    finally:
        first.stop()
        second.stop()
