"""The chat: transcript, prompt, live latency; replies come from a thread worker."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.message import Message as TextualMessage
from textual.reactive import reactive
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import Input, Static
from textual.worker import get_current_worker

from ....shared.errors import DaemonUnreachable, SplitlmError
from ..messages import (
    EngineFailed,
    EngineProgress,
    EngineReady,
    Failover,
    ReplyDone,
    ReplyFailed,
    ReplyToken,
)
from ..stats import DraftFigures, fmt_ms, fmt_rate
from ..turns import Message, title_for
from ..widgets.chat_message import ChatMessage
from ..widgets.key_footer import KeyFooter
from ..widgets.latency_strip import LatencyStrip
from ..widgets.progress_panel import ProgressPanel
from ..widgets.status_bar import StatusBar

if TYPE_CHECKING:
    from textual.await_remove import AwaitRemove

    from ..app import SplitlmApp
    from ..engine import ReplyOutcome

log = logging.getLogger(__name__)

LOAD_THREAD = "splitlm-load"
"""The name of the thread that loads the engine (``launch`` looks for it when the app quits)."""

LOADING_PLACEHOLDER = "Loading the model… type a prompt: Enter holds it until ready"
READY_PLACEHOLDER = "Type a prompt; Enter sends"
DOWN_PLACEHOLDER = "Not connected: Enter retries and sends, ctrl+y retries"

WELCOME = (
    "Type a prompt below; Enter sends it. The reply streams in, with each token's latency on the "
    "line above the prompt.\n\n"
    "ctrl+l: where the time went · ctrl+t: the server · ctrl+f: full model vs split · "
    "ctrl+s: settings · ctrl+p: every command · ctrl+q: quit"
)

PENDING_NOTE = "· waiting for the model… (Esc takes it back)"
"""The header note of a prompt sent before the engine was ready."""

FINISH_NOTES = {
    "eos": "",
    "length": "· hit the length limit",
    "stop": "· stop string",
    "cancelled": "· stopped (Esc)",
    "failed": "· cut off: the daemon went away",
}


def reply_note(outcome: ReplyOutcome) -> str:
    """The header note of a finished reply: tokens, speed, TTFT, how it ended."""
    s = outcome.stats
    note = f"· {s.tokens} tok · {fmt_rate(s.tokens_per_s)} · TTFT {fmt_ms(s.ttft_s, 0)}"
    end = FINISH_NOTES.get(outcome.result.finish_reason, "")
    return f"{note} {end}".rstrip()


class ChatScreen(Screen[None]):
    """The main screen.

    | Key | Action |
    | :- | :- |
    | enter | send the prompt (while the model loads: hold it, and send it once ready) |
    | ctrl+j | the same (what Enter sends before the app owns the terminal) |
    | escape | stop the reply (the partial reply stays); take back a held prompt; cancel an edit |
    | ctrl+n | new chat |
    | ctrl+r | regenerate the last reply |
    | ctrl+g | edit the last prompt (Enter sends it, replacing the last exchange) |
    """

    BINDINGS = [
        Binding("escape", "take_back", "Take back", tooltip="the prompt waiting for the model comes back to the box"),
        Binding("escape", "stop", "Stop", tooltip="stop the reply; what came so far stays"),
        Binding("ctrl+n", "new_chat", "New", tooltip="start a new conversation"),
        Binding("ctrl+r", "regenerate", "Regen", tooltip="generate the last reply again"),
        Binding("ctrl+g", "edit_last", "Edit", tooltip="edit the last prompt and send it again"),
        Binding("ctrl+j", "send_prompt", "Send", show=False,
                tooltip="Enter as a terminal still in line mode sends it (keys typed as the app starts)"),
    ]

    generating: reactive[bool] = reactive(False, bindings=True)
    """A reply worker is running."""
    editing: reactive[bool] = reactive(False, bindings=True)
    """The prompt box holds the last prompt for editing."""
    starting: reactive[bool] = reactive(False, bindings=True)
    """The engine is loading or reconnecting."""
    pending: reactive[str] = reactive("", bindings=True)
    """A prompt sent before the engine was ready: it waits in the transcript, marked, and goes
    out when the engine is ready; a failed load or Esc puts it back into the box."""

    def __init__(self) -> None:
        super().__init__(id="chat")
        self.messages: list[Message] = []
        self.conversation_id: int | None = None
        self._stop = threading.Event()
        self._streaming: ChatMessage | None = None
        self._strip_timer: Timer | None = None
        self._draft_figures: DraftFigures | None = None
        """The streaming reply's latest draft figures, drawn on the flush timer."""
        self._pending_reconnect = False
        """The last load failed because no daemon answered: load again once it is back."""
        self._pending_widget: ChatMessage | None = None
        """The transcript's entry of ``pending``."""

    @property
    def splitlm(self) -> SplitlmApp:
        return cast("SplitlmApp", self.app)

    def compose(self) -> ComposeResult:
        yield StatusBar()
        yield ProgressPanel(id="loading")
        yield VerticalScroll(id="transcript")
        yield LatencyStrip(id="latency")
        yield Input(placeholder=LOADING_PLACEHOLDER, id="prompt")
        yield KeyFooter()

    def on_mount(self) -> None:
        prompt = self.query_one("#prompt", Input)
        prompt.cursor_blink = self.splitlm.config.animations
        self.query_one(ProgressPanel).done()
        transcript = self.query_one("#transcript", VerticalScroll)
        transcript.mount(Static(WELCOME, id="welcome"))
        transcript.anchor()
        self.set_focus(prompt)  # now, not at the next idle (``focus``): keys typed at start go here
        if self.splitlm.autoload and not self.splitlm.engine.loaded:
            self.start_load(reconnect=False)

    # --- which keys apply now (the footer and the palette follow) ---

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Keys that cannot apply now are hidden (the footer stays readable at 80 columns)."""
        if action == "take_back":
            return bool(self.pending) and not self.generating
        if action == "stop":
            return self.generating or (self.editing and not self.pending)
        if action in ("regenerate", "edit_last"):
            has_reply = bool(self.messages) and self.messages[-1].role == "assistant"
            return has_reply and not self.generating and not self.starting
        if action == "new_chat":
            return bool(self.messages) and not self.generating and not self.pending
        return True

    # --- loading ---

    def start_load(self, reconnect: bool) -> None:
        if self.generating or self.starting:
            return
        self.starting = True
        self._pending_reconnect = False
        self.splitlm.engine_loading(reconnect and self.splitlm.engine.parts is not None)
        self.query_one("#prompt", Input).placeholder = LOADING_PLACEHOLDER
        threading.Thread(target=self.load_engine, args=(reconnect,), name=LOAD_THREAD, daemon=True).start()

    def load_engine(self, reconnect: bool) -> None:
        """Load (or reconnect) the engine and post what happens; runs on its own thread.

        Not a Textual thread worker: those run in asyncio's default executor, which the app
        joins when it exits, so ctrl+q during a 30 s load would hang until the load ends. A load
        holds nothing worth finishing (``launch`` ends the process without waiting for it), and
        ``starting`` already keeps two loads from overlapping. Only posts messages (any thread).
        """
        engine = self.splitlm.engine

        def progress(label: str, step: int, total: int) -> None:
            self.post_message(EngineProgress(label, step, total))

        try:
            plan = engine.reconnect(progress) if reconnect else engine.load(progress)
        except SplitlmError as e:
            log.warning("load failed: %s", e)
            self.post_message(EngineFailed(str(e), isinstance(e, DaemonUnreachable)))
            return
        except Exception as e:  # a bug: logged with its traceback, told briefly, never raised on screen
            log.exception("load failed")
            self.post_message(EngineFailed(f"{type(e).__name__}: {e}", False))
            return
        self.post_message(EngineReady(plan))

    def on_engine_progress(self, msg: EngineProgress) -> None:
        self.query_one(ProgressPanel).report(msg.label, msg.step, msg.total)
        self.splitlm.engine_progress(msg.step, msg.total)

    async def on_engine_ready(self, msg: EngineReady) -> None:
        self.starting = False
        self.query_one(ProgressPanel).done()
        self.splitlm.engine_ready(msg.plan)
        self.query_one("#prompt", Input).placeholder = READY_PLACEHOLDER
        if self.pending:
            text = self.pending
            removed = self._take_pending()
            if removed is not None:
                await removed  # an edit drops the last exchange by position in the transcript
            self._submit(text)

    def on_engine_failed(self, msg: EngineFailed) -> None:
        self.starting = False
        self.query_one(ProgressPanel).done()
        self._pending_reconnect = msg.unreachable
        self.query_one("#prompt", Input).placeholder = DOWN_PLACEHOLDER
        restored = bool(self.pending)
        if restored:
            self._restore_pending()
        self.splitlm.engine_failed(msg.error, msg.unreachable, prompt_restored=restored)

    def daemon_back(self) -> None:
        """The monitor sees the daemon again: load if the last try found no daemon."""
        if self._pending_reconnect:
            self.start_load(reconnect=True)

    def retry(self) -> None:
        """The retry key: load, or reconnect the session."""
        if not self.generating:
            self.start_load(reconnect=True)

    # --- sending ---

    @on(Input.Submitted, "#prompt")
    def send(self, event: Input.Submitted) -> None:
        """Enter: send now when the engine is ready; while it loads (or after a failed load,
        which Enter then retries), hold the prompt in the transcript and send it once ready."""
        text = event.value.strip()
        if not text:
            return
        if self.generating:
            self.notify("a reply is still coming: Esc stops it", severity="warning")
            return
        if self.pending:
            self.notify("a prompt is already waiting for the model: Esc takes it back", severity="warning")
            return
        event.input.value = ""
        if self.starting or not self.splitlm.engine.loaded:
            self._hold(text)
            if not self.starting:
                self.start_load(reconnect=True)
            return
        self._submit(text)

    def _submit(self, text: str) -> None:
        """Add the prompt to the conversation and start its reply (replacing the last exchange
        when editing)."""
        floor = None
        if self.editing:
            self.editing = False
            floor = self._drop_last_exchange()
        self._add(Message("user", text))
        self._start_reply(floor)

    def _hold(self, text: str) -> None:
        """Show ``text`` as a prompt waiting for the model; it is not part of the conversation
        until it is sent."""
        self._hide_welcome()
        widget = ChatMessage("user", text, PENDING_NOTE)
        widget.add_class("-pending")
        self.query_one("#transcript", VerticalScroll).mount(widget)
        self._pending_widget = widget
        self.pending = text
        log.info("holding a prompt of %d characters until the engine is ready", len(text))

    def _take_pending(self) -> AwaitRemove | None:
        """Remove the held prompt from the transcript (it is sent or comes back to the box);
        await the result before querying the transcript's messages."""
        self.pending = ""
        widget, self._pending_widget = self._pending_widget, None
        return widget.remove() if widget is not None else None

    def _restore_pending(self) -> None:
        """The held prompt goes back into the box, before anything typed since."""
        text = self.pending
        self._take_pending()
        prompt = self.query_one("#prompt", Input)
        rest = prompt.value.strip()
        prompt.value = f"{text} {rest}" if rest else text
        prompt.cursor_position = len(text)
        prompt.focus()

    def _drop_last_exchange(self) -> int | None:
        """Remove the last prompt and its reply (edit); the new one starts at most where the old
        one did."""
        last = self.splitlm.engine.last_plan
        while self.messages and self.messages[-1].role == "assistant":
            self._pop_message()
        if self.messages and self.messages[-1].role == "user":
            self._pop_message()
        return last.start if last else None

    def _pop_message(self) -> None:
        self.messages.pop()
        widgets = self.query_one("#transcript").query(ChatMessage)
        if widgets:
            widgets.last().remove()

    def _add(self, message: Message, note: str = "") -> ChatMessage:
        self._hide_welcome()
        self.messages.append(message)
        widget = ChatMessage(message.role, message.content, note)
        self.query_one("#transcript", VerticalScroll).mount(widget)
        return widget

    def _hide_welcome(self) -> None:
        for w in self.query("#welcome"):
            w.remove()

    def _start_reply(self, floor: int | None) -> None:
        self._streaming = ChatMessage("assistant", "", "· …")
        self.query_one("#transcript", VerticalScroll).mount(self._streaming)
        self.query_one(LatencyStrip).reset()
        self._stop.clear()
        self.generating = True
        self._draft_figures = None
        self._strip_timer = self.set_interval(0.25, self._flush_figures)
        self.run_reply(list(self.messages), floor)

    def _post(self, message: TextualMessage) -> None:
        """``post_message`` for the engine's callbacks, which are typed to return nothing."""
        self.post_message(message)

    @work(thread=True, exclusive=True, group="reply", exit_on_error=False)
    def run_reply(self, messages: list[Message], floor: int | None) -> None:
        worker = get_current_worker()
        engine = self.splitlm.engine
        engine.on_failover = lambda ev: self._post(Failover(ev))
        try:
            outcome = engine.reply(
                messages, self.splitlm.settings, floor,
                on_token=lambda ev: self._post(ReplyToken(ev)),
                should_stop=lambda: self._stop.is_set() or worker.is_cancelled,
            )
        except SplitlmError as e:
            log.warning("reply failed: %s", e)
            self.post_message(ReplyFailed(str(e), isinstance(e, DaemonUnreachable)))
            return
        except Exception as e:
            log.exception("reply failed")
            self.post_message(ReplyFailed(f"{type(e).__name__}: {e}", False))
            return
        self.post_message(ReplyDone(outcome))

    def on_reply_token(self, msg: ReplyToken) -> None:
        ev = msg.event
        if self._streaming is not None:
            self._streaming.append(ev.delta)
        self.query_one(LatencyStrip).record(ev.index, ev.latency_s)
        self._draft_figures = DraftFigures.of_event(self.splitlm.engine.draft_in_use, ev)

    def _flush_figures(self) -> None:
        """The flush timer: the latency line and the status bar's draft figures, a few times a
        second rather than per token (the reply's thread keeps its pace)."""
        self.query_one(LatencyStrip).refresh_figures()
        if self._draft_figures is not None:
            self.splitlm.show_draft(self._draft_figures)
            self._draft_figures = None

    async def on_reply_done(self, msg: ReplyDone) -> None:
        outcome = msg.outcome
        text = outcome.result.text
        await self._end_reply(text, reply_note(outcome), outcome.result.finish_reason)
        self.splitlm.reply_finished(outcome)

    async def on_reply_failed(self, msg: ReplyFailed) -> None:
        partial = self._streaming.text if self._streaming is not None else ""
        await self._end_reply(partial, FINISH_NOTES["failed"] if msg.unreachable else "· failed", "failed")
        self.splitlm.reply_failed(msg.error, msg.unreachable)

    async def _end_reply(self, text: str, note: str, finish_reason: str) -> None:
        if self._strip_timer is not None:
            self._strip_timer.stop()
            self._strip_timer = None
        self._flush_figures()
        if self._streaming is not None:
            await self._streaming.finish(text, note)
            self._streaming = None
        self.messages.append(Message("assistant", text, finish_reason))
        self.generating = False
        self._save()

    def on_failover(self, msg: Failover) -> None:
        self.splitlm.failover(msg.event)

    # --- actions ---

    async def action_send_prompt(self) -> None:
        """ctrl+j is what Enter becomes when pressed before the app owns the terminal."""
        prompt = self.query_one("#prompt", Input)
        if prompt.has_focus:
            await prompt.action_submit()

    def action_take_back(self) -> None:
        """Esc on a prompt waiting for the model: back into the box; the load goes on."""
        if self.pending:
            self._restore_pending()

    def action_stop(self) -> None:
        if self.generating:
            self._stop.set()
            self.splitlm.engine.stop_reconnect()
        elif self.editing:
            self.editing = False
            self.query_one("#prompt", Input).value = ""

    async def action_new_chat(self) -> None:
        if self.generating or self.pending:
            return
        transcript = self.query_one("#transcript")
        await transcript.remove_children()
        await transcript.mount(Static(WELCOME, id="welcome"))
        self.messages = []
        self.conversation_id = None
        self.editing = False
        self.splitlm.engine.forget_cache()
        self.query_one(LatencyStrip).reset()
        self.query_one("#prompt", Input).focus()

    def action_regenerate(self) -> None:
        if self.generating or not self.messages or self.messages[-1].role != "assistant":
            return
        last = self.splitlm.engine.last_plan
        self._pop_message()
        self._start_reply(last.start if last else None)

    def action_edit_last(self) -> None:
        users = [m for m in self.messages if m.role == "user"]
        if self.generating or not users:
            return
        prompt = self.query_one("#prompt", Input)
        prompt.value = users[-1].content
        prompt.cursor_position = len(prompt.value)
        prompt.focus()
        self.editing = True
        self.notify("editing the last prompt: Enter sends it, Esc cancels", timeout=3)

    # --- conversations ---

    def _save(self) -> None:
        if not self.messages:
            return
        first = next((m.content for m in self.messages if m.role == "user"), "")
        try:
            self.conversation_id = self.splitlm.store.save(
                self.conversation_id, title_for(first), self.splitlm.settings, self.messages
            )
        except Exception as e:  # a full disk must not end the chat
            log.exception("saving the conversation failed")
            self.notify(f"could not save the conversation: {e}", severity="error")

    async def open_conversation(self, conversation_id: int) -> None:
        if self.generating or self.pending:
            return
        stored = self.splitlm.store.load(conversation_id)
        self.splitlm.settings = stored.settings.keeping_session_of(self.splitlm.settings)
        await self.show_conversation(stored.id, stored.messages)
        self.notify(f"opened “{stored.title}”", timeout=2)

    async def show_conversation(self, conversation_id: int | None, messages: Sequence[Message]) -> None:
        """Replace the transcript with ``messages`` (a reopened conversation)."""
        await self.action_new_chat()
        self.conversation_id = conversation_id
        transcript = self.query_one("#transcript", VerticalScroll)
        self._hide_welcome()
        for m in messages:
            self.messages.append(m)
            note = FINISH_NOTES.get(m.finish_reason, "") if m.role == "assistant" else ""
            await transcript.mount(ChatMessage(m.role, m.content, note))
        transcript.anchor()

    def last_user_prompt(self) -> str:
        return next((m.content for m in reversed(self.messages) if m.role == "user"), "")
