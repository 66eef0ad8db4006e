"""MonitorPanel fed fixed samples: figures, sparklines, GPU lines or the no-GPU reason."""

from __future__ import annotations

from textual.app import App, ComposeResult
from textual.widgets import Sparkline

from splitlm.tui.app.monitor_history import MonitorHistory
from splitlm.tui.app.widgets.figures import Figures
from splitlm.tui.app.widgets.monitor_panel import MonitorPanel, gpu_line
from tests.tui import fakes
from tests.tui.conftest import wait_until


class Host(App[None]):
    def compose(self) -> ComposeResult:
        yield MonitorPanel()


async def test_gpus_and_history() -> None:
    app = Host()
    history = MonitorHistory(minutes=1, interval_s=1.0)
    async with app.run_test(size=(100, 30)) as pilot:
        panel = app.query_one(MonitorPanel)
        for i in range(75):  # more than the window: the oldest drop out
            history.add(fakes.sample(i, gpus=True))
            panel.show(history)
        await wait_until(pilot, lambda: bool(panel.query(".gpu-line")) and "NVIDIA L4" in str(
            panel.query_one(".gpu-line").render()), what="the GPU line")
        panel.show(history)
        await pilot.pause()
        assert len(history.samples) == 60
        s = history.latest
        figures = panel.query_one(Figures)
        assert figures.value("sessions") == "2 open, 2 queued"
        assert figures.value("step p95") == "31.7 ms"
        cpu = panel.query_one("#spark-cpu").query_one(Sparkline)
        assert list(cpu.data) == [x.cpu_percent for x in history.samples]
        assert str(panel.query_one(".gpu-line").render()) == gpu_line(s.gpus[0])
        assert "61°C" in gpu_line(s.gpus[0]) and "72 W" in gpu_line(s.gpus[0])


async def test_no_gpu_shows_the_reason() -> None:
    app = Host()
    history = MonitorHistory()
    async with app.run_test() as pilot:
        panel = app.query_one(MonitorPanel)
        history.add(fakes.sample(0, gpus=False))
        panel.show(history)
        await pilot.pause()
        assert "NVML Shared Library Not Found" in str(panel.query_one(".gpu-status").render())
        assert not panel.query_one("#monitor-waiting").display
