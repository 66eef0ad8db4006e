"""A labelled progress bar for long work (loading the parts, loading the full model)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Label, ProgressBar


class ProgressPanel(Vertical):
    """What is happening and how far along; hidden (``display: none``) when idle."""

    def compose(self) -> ComposeResult:
        yield Label("", classes="progress-label")
        yield ProgressBar(total=1, show_eta=False, classes="progress-bar")

    def report(self, label: str, step: int, total: int) -> None:
        self.display = True
        self.query_one(".progress-label", Label).update(label)
        self.query_one(ProgressBar).update(total=max(1, total), progress=step)

    def done(self) -> None:
        self.display = False
