"""A labelled sparkline with its current value: ``cpu ▁▂▅▇▆ 37%``."""

from __future__ import annotations

from collections.abc import Sequence

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Label, Sparkline


class SparkRow(Horizontal):
    """One row: a name, a sparkline of recent values, the latest value as text.

    Args:
        name: the row's label (a few characters).
    """

    def __init__(self, name: str, *, id: str | None = None) -> None:
        super().__init__(id=id, classes="spark-row")
        self._title = name  # not _name: Widget keeps the widget's own name there
        self._values: list[float] = []
        self._text = ""

    def compose(self) -> ComposeResult:
        yield Label(self._title, classes="spark-name")
        yield Sparkline([], classes="spark-line")
        yield Label("", classes="spark-value")

    def on_mount(self) -> None:
        self._draw()

    def show(self, values: Sequence[float], text: str) -> None:
        """Plot ``values`` (oldest first) and show ``text`` as the current value (kept until the
        row is mounted when it is not yet)."""
        self._values, self._text = list(values), text
        if self.is_mounted:
            self._draw()

    def _draw(self) -> None:
        lines = self.query(Sparkline)
        if lines:
            lines.first().data = self._values
            self.query_one(".spark-value", Label).update(self._text)
