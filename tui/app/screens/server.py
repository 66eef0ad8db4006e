"""The daemon's host, live from the monitor stream; over a route, each daemon's, one after another."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Label

from ..widgets.key_footer import KeyFooter
from ..widgets.monitor_panel import MonitorPanel
from ..widgets.status_bar import StatusBar

if TYPE_CHECKING:
    from ..app import SplitlmApp


class ServerScreen(Screen[None]):
    """CPU, memory, GPUs, sessions, queue and trunk speed, with sparklines of the last minutes;
    a panel per daemon when the trunk is a route of several (``--trunk`` given more than once).

    | Key | Action |
    | :- | :- |
    | escape | back to the chat |
    """

    BINDINGS = [Binding("escape", "app.back", "Back")]

    def __init__(self) -> None:
        super().__init__(id="server-screen")

    @property
    def splitlm(self) -> SplitlmApp:
        return cast("SplitlmApp", self.app)

    def compose(self) -> ComposeResult:
        yield StatusBar()
        addresses = self.splitlm.config.monitor_addresses
        if len(addresses) == 1:
            yield Label("Server: the trunk daemon's host (monitor stream)", classes="screen-title")
            yield Label("", id="monitor-note")
            yield MonitorPanel()
        else:
            yield Label(f"Server: the hosts of the route's {len(addresses)} trunk daemons (monitor streams)",
                        classes="screen-title")
            yield Label("", id="monitor-note")
            with VerticalScroll(id="monitor-route"):
                for i, address in enumerate(addresses):
                    yield Label(f"daemon {i + 1} of {len(addresses)}: {address}", classes="monitor-heading")
                    yield MonitorPanel(id=f"monitor-panel-{i}")
        yield KeyFooter()

    def on_mount(self) -> None:
        self.watch(self.app, "monitor_samples", lambda _: self.refresh_panel(), init=True)
        self.watch(self.app, "monitor_note", lambda note: self._note(note), init=True)

    def _note(self, note: str) -> None:
        label = self.query_one("#monitor-note", Label)
        label.update(note)
        label.display = bool(note)

    def refresh_panel(self) -> None:
        for panel, history in zip(self.query(MonitorPanel), self.splitlm.monitors):
            panel.show(history)
