"""Full vs split: the same prompt both ways, side by side."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, cast

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.reactive import reactive
from textual.screen import Screen
from textual.widgets import Input, Label, Static

from ....shared.errors import SplitlmError
from ..messages import CompareDone, CompareFailed, CompareProgress
from ..widgets.compare_table import CompareTable
from ..widgets.key_footer import KeyFooter
from ..widgets.progress_panel import ProgressPanel
from ..widgets.status_bar import StatusBar

if TYPE_CHECKING:
    from ..app import SplitlmApp
    from ..comparison import CompareReport

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "Why is the sky blue?"


def agreement_text(report: CompareReport) -> str:
    a = report.comparison.agreement
    if a.identical:
        return f"agreement 100%: all {a.full_tokens} tokens identical"
    return (
        f"agreement {a.percent:.0f}%: {a.matching_prefix} tokens agree, first difference at token "
        f"{a.first_difference} (full {a.full_tokens}, split {a.split_tokens} tokens)"
    )


class CompareScreen(Screen[None]):
    """Runs a prompt through the full model here and through the split.

    | Key | Action |
    | :- | :- |
    | enter | run the prompt both ways |
    | escape | stop a run, else back to the chat |
    """

    BINDINGS = [Binding("escape", "back_or_stop", "Back/Stop")]

    running: reactive[bool] = reactive(False)

    def __init__(self) -> None:
        super().__init__(id="compare-screen")
        self._stop = threading.Event()
        self.report: CompareReport | None = None

    @property
    def splitlm(self) -> SplitlmApp:
        return cast("SplitlmApp", self.app)

    def compose(self) -> ComposeResult:
        yield StatusBar()
        yield Input(placeholder="prompt; Enter runs it full and split", id="compare-prompt")
        yield ProgressPanel(id="compare-progress")
        yield Label("Enter runs the prompt through the full model here and through the split.",
                    id="compare-agreement")
        with Horizontal(id="compare-columns"):
            with Vertical(classes="compare-col"):
                yield Label("full (here)", classes="col-title")
                yield VerticalScroll(Static("", id="full-text"))
            with Vertical(classes="compare-col"):
                yield Label("split (through the daemon)", classes="col-title")
                yield VerticalScroll(Static("", id="split-text"))
        yield CompareTable(id="compare-table")
        yield KeyFooter()

    def on_mount(self) -> None:
        self.query_one(ProgressPanel).done()
        self.query_one(CompareTable).display = False

    def on_screen_resume(self) -> None:
        inp = self.query_one("#compare-prompt", Input)
        inp.cursor_blink = self.splitlm.config.animations
        if not inp.value:
            inp.value = self.splitlm.last_prompt() or DEFAULT_PROMPT
        inp.focus()

    @on(Input.Submitted, "#compare-prompt")
    def run(self, event: Input.Submitted) -> None:
        prompt = event.value.strip()
        if not prompt or self.running:
            return
        if not self.splitlm.engine.loaded:
            self.notify("not connected: the split needs the daemon (ctrl+y retries)", severity="warning")
            return
        if self.splitlm.busy():
            self.notify("a chat reply is running; compare when it is done", severity="warning")
            return
        self.running = True
        self._stop.clear()
        self.query_one("#compare-agreement", Label).update("running…")
        self.compare(prompt)

    @work(thread=True, exclusive=True, group="compare", exit_on_error=False)
    def compare(self, prompt: str) -> None:
        def progress(label: str, step: int, total: int) -> None:
            self.post_message(CompareProgress(label, step, total))

        try:
            report = self.splitlm.comparer.run(prompt, self.splitlm.settings, progress, self._stop.is_set)
        except SplitlmError as e:
            self.post_message(CompareFailed(str(e)))
            return
        except Exception as e:
            log.exception("compare failed")
            self.post_message(CompareFailed(f"{type(e).__name__}: {e}"))
            return
        self.post_message(CompareDone(report))

    def on_compare_progress(self, msg: CompareProgress) -> None:
        self.query_one(ProgressPanel).report(msg.label, msg.step, msg.total)

    def on_compare_done(self, msg: CompareDone) -> None:
        self.running = False
        self.report = r = msg.report
        self.query_one(ProgressPanel).done()
        self.query_one("#compare-agreement", Label).update(agreement_text(r))
        self.query_one("#full-text", Static).update(Text(r.comparison.full.text))
        self.query_one("#split-text", Static).update(Text(r.comparison.split.text))
        table = self.query_one(CompareTable)
        table.show(r)
        table.display = True

    def on_compare_failed(self, msg: CompareFailed) -> None:
        self.running = False
        self.query_one(ProgressPanel).done()
        self.query_one("#compare-agreement", Label).update(f"failed: {msg.error.splitlines()[0]}")
        self.notify(msg.error, severity="error", timeout=8)

    async def action_back_or_stop(self) -> None:
        if self.running:
            self._stop.set()
        else:
            await self.app.action_back()
