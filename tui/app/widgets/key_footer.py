"""The footer every screen shows: compact, and the palette hint only where there is room."""

from __future__ import annotations

from textual import events
from textual.widgets import Footer


class KeyFooter(Footer):
    """A compact ``Footer``; below ``PALETTE_MIN_WIDTH`` columns the ``^p palette`` hint gives its
    room to the screen's own keys (ctrl+p still opens the palette)."""

    PALETTE_MIN_WIDTH = 100

    def __init__(self) -> None:
        super().__init__(compact=True)

    def on_resize(self, event: events.Resize) -> None:
        self.show_command_palette = event.size.width >= self.PALETTE_MIN_WIDTH
