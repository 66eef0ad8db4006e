"""The one-line status bar every screen shows: the model, the plan and the daemon's state."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

STATE_MARKS = {
    "connected": ("●", "status--ok"),
    "connecting": ("◌", "status--wait"),
    "reconnecting": ("◌", "status--wait"),
    "down": ("✖", "status--bad"),
    "loading": ("◌", "status--wait"),
    "failed": ("✖", "status--bad"),
}


class StatusBar(Widget):
    """``splitlm ● state · MODEL A:B · DRAFT · ADDRESS``; follows the app's ``connection``,
    ``plan_text``, ``draft_text``, ``address`` and ``connection_hint`` reactives.

    The draft field is empty without a draft; with one it names it and, while a reply streams
    and after, its tokens per round trip and acceptance (``stats.draft_status``).

    | Class | Description |
    | :- | :- |
    | `status--ok` | the state mark when connected |
    | `status--wait` | loading, connecting or reconnecting |
    | `status--bad` | down, or the load failed |
    | `status--draft` | the draft and its figures |
    """

    COMPONENT_CLASSES = {"status--ok", "status--wait", "status--bad", "status--dim", "status--draft"}

    state: reactive[str] = reactive("connecting")
    plan_text: reactive[str] = reactive("")
    address: reactive[str] = reactive("")
    hint: reactive[str] = reactive("")
    """Shown at the end, e.g. the retry key when down."""
    draft: reactive[str] = reactive("")
    """The draft and its figures (empty: no draft)."""

    WATCHED = {
        "connection": "state", "plan_text": "plan_text", "address": "address", "connection_hint": "hint",
        "draft_text": "draft",
    }
    """The app's reactive -> this bar's reactive (an app without one leaves it alone)."""

    def on_mount(self) -> None:
        for source, target in self.WATCHED.items():
            if hasattr(self.app, source):
                self.watch(self.app, source, self._setter(target))

    def _setter(self, target: str):  # type: ignore[no-untyped-def]
        def set_value(value: str) -> None:
            setattr(self, target, value)

        return set_value

    def render(self) -> Text:
        """The state comes first so that a narrow terminal cuts the address, never the state;
        the draft's figures come before the address, which matters less while chatting."""
        mark, cls = STATE_MARKS.get(self.state, ("?", "status--dim"))
        dim = self.get_component_rich_style("status--dim")
        out = Text(no_wrap=True, overflow="ellipsis")
        out.append("splitlm ", style="bold")
        out.append(f"{mark} {self.state}", style=self.get_component_rich_style(cls))
        if self.hint:
            out.append(f" ({self.hint})", style=dim)
        if self.plan_text:
            out.append(" · " + self.plan_text)
        if self.draft:
            out.append(" · ")
            out.append(self.draft, style=self.get_component_rich_style("status--draft"))
        out.append(" · " + self.address, style=dim)
        if self.content_size.width:  # cut with an ellipsis: a long address would wrap out of sight
            out.truncate(self.content_size.width, overflow="ellipsis")
        return out
