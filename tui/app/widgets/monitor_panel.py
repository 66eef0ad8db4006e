"""The daemon's host as the monitor stream reports it: figures, sparklines, GPUs."""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Label

from ..monitor_history import MonitorHistory
from ..stats import fmt_bytes
from .figures import Figures
from .spark_row import SparkRow


def gib(n: float) -> str:
    return f"{n / 2**30:.1f}"


def gpu_line(g: Any) -> str:
    """``GPU0 NAME  util 37%  mem 10.1/40.0 GiB  61°C  120 W`` (temperature and power when known)."""
    parts = [f"GPU{g.index} {g.name}", f"util {g.utilization_percent:.0f}%",
             f"mem {gib(g.memory_used_bytes)}/{gib(g.memory_total_bytes)} GiB"]
    if g.temperature_c is not None:
        parts.append(f"{g.temperature_c:.0f}°C")
    if g.power_w is not None:
        parts.append(f"{g.power_w:.0f} W")
    return "  ".join(parts)


class MonitorPanel(Vertical):
    """Shows a ``MonitorHistory``: the latest sample's figures and sparklines of the window."""

    def compose(self) -> ComposeResult:
        yield Label("waiting for the first sample…", id="monitor-waiting")
        yield Figures(columns=2, id="monitor-figures")
        yield SparkRow("cpu %", id="spark-cpu")
        yield SparkRow("memory", id="spark-mem")
        yield SparkRow("tok/s", id="spark-tps")
        yield SparkRow("queue", id="spark-queue")
        yield Vertical(id="monitor-gpus")

    def show(self, history: MonitorHistory) -> None:
        s = history.latest
        if s is None:
            return
        self.query_one("#monitor-waiting", Label).display = False
        self.query_one("#monitor-figures", Figures).show(
            [
                ("CPU", f"{s.cpu_percent:.0f}%  load {s.load_1m:.2f} {s.load_5m:.2f} {s.load_15m:.2f}"),
                ("memory", f"{gib(s.mem_used_bytes)}/{gib(s.mem_total_bytes)} GiB"),
                ("daemon RSS", fmt_bytes(s.daemon_rss_bytes)),
                ("trunk cache", fmt_bytes(s.trunk_cache_bytes)),
                ("sessions", f"{s.sessions_open} open, {s.steps_queued} queued"),
                ("trunk", f"{s.tokens_per_s:.1f} tok/s, {s.steps} steps"),
                ("step p50", f"{s.step_p50_ms:.1f} ms"),
                ("step p95", f"{s.step_p95_ms:.1f} ms"),
            ]
        )
        self.query_one("#spark-cpu", SparkRow).show(history.series(lambda x: x.cpu_percent), f"{s.cpu_percent:.0f}%")
        self.query_one("#spark-mem", SparkRow).show(
            history.series(lambda x: x.mem_used_bytes / 2**30), f"{gib(s.mem_used_bytes)} GiB"
        )
        self.query_one("#spark-tps", SparkRow).show(history.series(lambda x: x.tokens_per_s), f"{s.tokens_per_s:.1f}")
        self.query_one("#spark-queue", SparkRow).show(history.series(lambda x: x.steps_queued), str(s.steps_queued))
        self._show_gpus(history)

    def _show_gpus(self, history: MonitorHistory) -> None:
        s = history.latest
        if s is None:
            return
        box = self.query_one("#monitor-gpus", Vertical)
        if not s.gpus:
            reason = s.gpu_status or "no NVIDIA GPU"
            lines = list(box.query(".gpu-status"))
            if lines and len(box.children) == 1:
                lines[0].update(reason)  # type: ignore[attr-defined]
            else:
                box.remove_children()
                box.mount(Label(reason, classes="gpu-status"))
            return
        rows = list(box.query(SparkRow))
        if len(rows) != len(s.gpus):
            box.remove_children()
            box.mount_all(
                [w for g in s.gpus for w in (Label("", classes="gpu-line"), SparkRow(f"gpu{g.index} %"))]
            )
            self.call_after_refresh(self._show_gpus, history)  # once the rows are mounted
            return
        for g, row, line in zip(s.gpus, rows, box.query(".gpu-line")):
            line.update(gpu_line(g))  # type: ignore[attr-defined]
            row.show(history.gpu_series(g.index, lambda x: x.utilization_percent), f"{g.utilization_percent:.0f}%")
