"""A compact grid of named figures: ``TTFT 120 ms   p50 41.0 ms   ...``."""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table
from rich.text import Text
from textual.widgets import Static


class Figures(Static):
    """Label/value pairs laid out ``columns`` pairs to a row.

    Args:
        columns: pairs per row.
    """

    def __init__(self, columns: int = 2, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.columns = columns
        self.rows: list[tuple[str, str]] = []

    def show(self, rows: Sequence[tuple[str, str]]) -> None:
        """Replace the figures; the values are plain text (no markup)."""
        self.rows = list(rows)
        grid = Table.grid(padding=(0, 1), expand=True)
        for _ in range(self.columns):
            grid.add_column(style="dim", no_wrap=True)
            grid.add_column(no_wrap=True, ratio=1)
        for i in range(0, len(self.rows), self.columns):
            cells: list[Text] = []
            for label, value in self.rows[i : i + self.columns]:
                cells += [Text(label), Text(value, style="bold")]
            grid.add_row(*cells)
        self.update(grid)

    def value(self, label: str) -> str | None:
        """The value shown for ``label`` (tests read figures through this)."""
        return next((v for k, v in self.rows if k == label), None)
