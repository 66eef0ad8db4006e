"""The saved conversations, newest first: Enter opens one, Delete removes it."""

from __future__ import annotations

import time

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, OptionList
from textual.widgets.option_list import Option

from ..store import ConversationStore, ConversationSummary
from ..widgets.key_footer import KeyFooter


def when(ts: float, now: float | None = None) -> str:
    """``14:02`` today, else ``2026-11-01``."""
    now = time.time() if now is None else now
    t, n = time.localtime(ts), time.localtime(now)
    return time.strftime("%H:%M" if (t.tm_year, t.tm_yday) == (n.tm_year, n.tm_yday) else "%Y-%m-%d", t)


def option_for(c: ConversationSummary) -> Option:
    label = Text(c.title)
    label.append(f"  {c.messages} messages · {when(c.updated)}", style="dim")
    return Option(label, id=str(c.id))


class ConversationsScreen(ModalScreen[int | None]):
    """Dismisses with the chosen conversation's id, or None.

    | Key | Action |
    | :- | :- |
    | enter | open |
    | delete | delete |
    | escape | close |
    """

    BINDINGS = [
        Binding("escape", "close", "Close"),
        Binding("delete", "delete", "Delete"),
    ]

    def __init__(self, store: ConversationStore) -> None:
        super().__init__(id="conversations")
        self.store = store

    def compose(self) -> ComposeResult:
        with Vertical(id="conversations-box"):
            yield Label("Conversations", classes="box-title")
            yield OptionList(id="conversation-list")
            yield Label("", id="conversations-empty")
        yield KeyFooter()

    def on_mount(self) -> None:
        self.reload()
        self.query_one(OptionList).focus()

    def reload(self) -> None:
        items = self.store.recent()
        ol = self.query_one(OptionList)
        ol.clear_options()
        ol.add_options([option_for(c) for c in items])
        self.query_one("#conversations-empty", Label).update("" if items else "No saved conversations yet.")
        if items:
            ol.highlighted = 0

    @on(OptionList.OptionSelected)
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(int(event.option.id or 0))

    def action_delete(self) -> None:
        ol = self.query_one(OptionList)
        if ol.highlighted is None:
            return
        option = ol.get_option_at_index(ol.highlighted)
        self.store.delete(int(option.id or 0))
        self.reload()

    def action_close(self) -> None:
        self.dismiss(None)
