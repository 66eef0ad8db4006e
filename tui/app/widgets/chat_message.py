"""One message of the transcript; a reply streams into it."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.reactive import reactive
from textual.timer import Timer
from textual.widgets import Label, Markdown, Static

ROLE_LABELS = {"user": "you", "assistant": "assistant", "system": "system"}


class ChatMessage(Vertical):
    """A prompt (plain text) or a reply (Markdown).

    A streaming reply buffers its deltas and flushes them to the Markdown widget on a timer, so a
    fast model costs a few renders a second, not one per token, and rendering never holds up
    generation.

    Args:
        role: ``user``, ``assistant`` or ``system``.
        text: the text so far.
        note: shown after the role in the header (token count, speed, how it ended).
        flush_interval_s: how often buffered deltas reach the screen.
    """

    note: reactive[str] = reactive("")
    """The header's note after the role label."""

    def __init__(self, role: str, text: str = "", note: str = "", flush_interval_s: float = 0.25) -> None:
        super().__init__(classes=f"message -{role}")
        self.role = role
        self._text = text
        self._pending: list[str] = []
        self._flush_interval_s = flush_interval_s
        self._timer: Timer | None = None
        self._stream: object | None = None
        self.set_reactive(ChatMessage.note, note)

    @property
    def text(self) -> str:
        """Everything received so far, flushed or not."""
        return self._text

    def compose(self) -> ComposeResult:
        yield Label(self._header(), classes="message-header")
        if self.role == "assistant":
            yield Markdown(self._text, classes="message-body")
        else:
            yield Static(Text(self._text), classes="message-body")

    def _header(self) -> Text:
        head = Text(ROLE_LABELS.get(self.role, self.role), style="bold")
        if self.note:
            head.append(f"  {self.note}", style="dim")
        return head

    def watch_note(self) -> None:
        if self.is_mounted:
            self.query_one(".message-header", Label).update(self._header())

    def append(self, delta: str) -> None:
        """Add streamed text; it reaches the screen at the next flush (UI thread)."""
        if not delta:
            return
        self._text += delta
        self._pending.append(delta)
        if self._timer is None:
            self._timer = self.set_interval(self._flush_interval_s, self.flush)

    async def flush(self) -> None:
        """Write buffered deltas to the Markdown (through a ``MarkdownStream``, which merges
        writes when rendering falls behind)."""
        if not self._pending or self.role != "assistant":
            return
        chunk = "".join(self._pending)
        self._pending.clear()
        md = self.query_one(Markdown)
        if self._stream is None:
            self._stream = Markdown.get_stream(md)
        await self._stream.write(chunk)  # type: ignore[attr-defined]

    async def finish(self, text: str | None = None, note: str = "") -> None:
        """The reply ended: flush, stop the timer, and show ``text`` when it differs from what
        streamed (text held back at the very end: a partial stop string or character)."""
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        await self.flush()
        if self._stream is not None:
            await self._stream.stop()  # type: ignore[attr-defined]
            self._stream = None
        if text is not None and text != self._text:
            self._text = text
            if self.role == "assistant":
                await self.query_one(Markdown).update(text)
            else:
                self.query_one(".message-body", Static).update(Text(text))
        self.note = note
