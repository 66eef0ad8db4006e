"""The app: screens, keys, workers' messages routed to state. Wiring only; the work is in
``engine``, ``comparison``, ``monitor_feed`` and ``store``, the drawing in ``screens``/``widgets``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from textual import work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.message import Message as TextualMessage
from textual.reactive import reactive
from textual.screen import Screen

from ...shared.errors import SplitlmError
from .comparison import Comparer
from .config import AppConfig, ChatSettings
from .engine import ChatEngine, PlanInfo, ReplyOutcome
from .messages import ConnectionChanged, MonitorSampled, MonitorUnavailable
from .monitor_feed import CONNECTED, CONNECTING, DOWN, RECONNECTING, MonitorFeed
from .monitor_history import MonitorHistory
from .screens.chat import ChatScreen
from .screens.compare import CompareScreen
from .screens.conversations import ConversationsScreen
from .screens.latency import LatencyScreen
from .screens.server import ServerScreen
from .screens.settings import SettingsScreen
from .stats import DraftFigures, draft_status
from .store import ConversationStore

log = logging.getLogger(__name__)

RETRY_HINT = "ctrl+y retry"

LOADING, FAILED = "loading", "failed"
"""The engine's own states in ``connection``: loading its parts; failed for another reason
than an absent daemon (a model mismatch, a bad file): the daemon may well be up."""


class SplitlmApp(App[None]):
    """``splitlm chat``.

    | Key | Action |
    | :- | :- |
    | ctrl+o | open a saved conversation |
    | ctrl+s | settings |
    | ctrl+l | latency of the last reply |
    | ctrl+t | server (monitor stream) |
    | ctrl+f | full vs split |
    | ctrl+y | retry the connection |
    | ctrl+q | quit |
    | ctrl+p | command palette |

    Args:
        config: start-up configuration.
        start_monitor: follow the daemon's monitor stream (tests that feed samples turn it off).
        autoload: load the parts at start (snapshot tests that feed fixed data turn it off).
        engine: the chat's engine (default: a ``ChatEngine`` on ``config``; tests pass one that
            loads slowly on purpose).
    """

    CSS_PATH = "splitlm.tcss"
    TITLE = "splitlm"
    SCREENS = {"latency": LatencyScreen, "server": ServerScreen, "compare": CompareScreen}
    BINDINGS = [
        Binding("ctrl+o", "open_conversation", "Open", tooltip="reopen a saved conversation"),
        Binding("ctrl+s", "settings", "Settings", tooltip="generation settings and the plan"),
        Binding("ctrl+l", "switch('latency')", "Stats", tooltip="latency of the last reply"),
        Binding("ctrl+t", "switch('server')", "Server", tooltip="the daemon's host, live"),
        Binding("ctrl+f", "switch('compare')", "Compare", tooltip="full model vs split, same prompt"),
        Binding("ctrl+y", "retry", "Retry", tooltip="reconnect to the daemon"),
        Binding("ctrl+q", "quit", "Quit", tooltip="quit splitlm", priority=True, show=False),
    ]

    connection: reactive[str] = reactive(CONNECTING)
    """The daemon as last seen (connecting, connected, reconnecting, down), or the engine's
    state while it is not ready (loading, failed)."""
    connection_hint: reactive[str] = reactive("")
    plan_text: reactive[str] = reactive("")
    address: reactive[str] = reactive("")
    monitor_samples: reactive[int] = reactive(0)
    """Count of monitor samples received (screens watch it)."""
    monitor_note: reactive[str] = reactive("")
    replies: reactive[int] = reactive(0)
    """Count of finished replies (the latency screen watches it)."""
    draft_text: reactive[str] = reactive("")
    """The status bar's draft field: the chosen draft and the latest reply's figures with it."""

    def __init__(
        self, config: AppConfig, start_monitor: bool = True, autoload: bool = True, engine: ChatEngine | None = None
    ) -> None:
        super().__init__()
        self.config = config
        self.settings: ChatSettings = config.settings
        self.engine = engine or ChatEngine(config)
        self.comparer = Comparer(self.engine)
        self.store = ConversationStore(config.db_path)
        self.monitors = [MonitorHistory(minutes=5, interval_s=config.monitor_interval_s)
                         for _ in config.monitor_addresses]
        """One window of samples per daemon (``AppConfig.monitor_addresses``: a route's each)."""
        self.last_reply: ReplyOutcome | None = None
        self.plan: PlanInfo | None = None
        self.draft_figures: DraftFigures | None = None
        """The streaming or last reply's draft figures."""
        self._start_monitor = start_monitor
        self.autoload = autoload
        self._feeds: list[MonitorFeed] = []
        self._feed_states: dict[int, tuple[str, str]] = {}
        self._engine_down = False
        if not config.animations:
            self.animation_level = "none"
        self.set_reactive(SplitlmApp.address, config.trunk)
        self.set_reactive(SplitlmApp.draft_text, draft_status(self.settings.draft, None))

    @property
    def monitor(self) -> MonitorHistory:
        """The first (or only) daemon's samples."""
        return self.monitors[0]

    @property
    def _feed(self) -> MonitorFeed | None:
        """The first daemon's feed (None before the monitor worker starts)."""
        return self._feeds[0] if self._feeds else None

    async def on_mount(self) -> None:
        # Mounted (and its prompt focused) before the queued input is handled: keys typed while
        # the app started reach the prompt instead of an empty screen.
        await self.push_screen(ChatScreen())
        if self._start_monitor:
            self.follow_monitor()

    def on_unmount(self) -> None:
        for feed in self._feeds:
            feed.stop()
        chat = self.chat_screen()
        if chat is not None:
            chat.action_stop()
        self.engine.stop_reconnect()
        self.store.close()

    # --- state shared by the screens ---

    def chat_screen(self) -> ChatScreen | None:
        return next((s for s in self.screen_stack if isinstance(s, ChatScreen)), None)

    def busy(self) -> bool:
        chat = self.chat_screen()
        return chat is not None and (chat.generating or chat.starting)

    def last_prompt(self) -> str:
        chat = self.chat_screen()
        return chat.last_user_prompt() if chat is not None else ""

    def engine_loading(self, reconnecting: bool) -> None:
        """The chat starts (re)building its engine: loading the parts, or only a new session."""
        self.connection = CONNECTING if reconnecting else LOADING
        self.connection_hint = ""

    def engine_progress(self, step: int, total: int) -> None:
        """The status bar counts the load's stages; the chat's progress panel names them."""
        if self.connection in (LOADING, CONNECTING):
            self.connection_hint = f"{step}/{total}"

    def engine_ready(self, plan: PlanInfo) -> None:
        self.plan = plan
        self._engine_down = False
        self.plan_text = f"{Path(plan.model).name or plan.model} {plan.split[0]}:{plan.split[1]}"
        self.connection = CONNECTED
        self.connection_hint = ""

    def engine_failed(self, error: str, unreachable: bool, prompt_restored: bool = False) -> None:
        """Loading failed; ``prompt_restored``: a held prompt went back into the box."""
        self._engine_down = True
        self.connection = DOWN if unreachable else FAILED
        self.connection_hint = RETRY_HINT
        first = error.splitlines()[0]
        back = " Your prompt is back in the box: Enter tries again." if prompt_restored else ""
        self.notify(f"{first}\nctrl+y retries.{back}", title="Not connected", severity="error", timeout=10)

    def reply_finished(self, outcome: ReplyOutcome) -> None:
        self.last_reply = outcome
        if outcome.draft_error and self.settings.draft == outcome.refused_draft:
            self.settings = replace(self.settings, draft=outcome.draft)
            self.notify(
                f"{outcome.draft_error.splitlines()[0]}\nThe reply used {outcome.draft}; ctrl+s chooses another.",
                title="Draft refused", severity="error", timeout=10,
            )
        self.show_draft(DraftFigures.of_result(outcome.draft, outcome.result))
        self.replies += 1

    def show_draft(self, figures: DraftFigures | None) -> None:
        """The status bar's draft field follows the streaming reply (``figures``) or, with
        None, the draft setting (the last figures stay while the draft does)."""
        if figures is not None:
            self.draft_figures = figures
        self.draft_text = draft_status(self.settings.draft, self.draft_figures)

    def reply_failed(self, error: str, unreachable: bool) -> None:
        if unreachable:
            self.connection = DOWN
            self.connection_hint = RETRY_HINT
            self.notify(
                f"{error.splitlines()[0]}\nThe partial reply stays. ctrl+y reconnects; ctrl+r regenerates.",
                title="Lost the daemon", severity="error", timeout=12,
            )
        else:
            self.notify(error.splitlines()[0], title="Reply failed", severity="error", timeout=10)

    def failover(self, event: Any) -> None:
        from ...shared.failover import Reconnecting

        if isinstance(event, Reconnecting):
            self.connection = RECONNECTING
            self.connection_hint = "Esc gives up"
            if event.attempt == 1:
                self.notify(
                    f"Lost the daemon ({event.error}); reconnecting for up to {event.deadline_s:.0f} s…",
                    title="Reconnecting", severity="warning", timeout=6,
                )
        else:
            self.connection = CONNECTED
            self.connection_hint = ""
            self.notify(
                f"Reconnected after {event.downtime_s:.1f} s; rebuilt the trunk cache "
                f"({event.replayed_positions} positions). The reply continues.",
                title="Reconnected", timeout=6,
            )

    # --- the monitor stream ---

    def _post(self, message: TextualMessage) -> None:
        """``post_message`` for the monitor feed's callbacks, which are typed to return nothing."""
        self.post_message(message)

    @work(thread=True, exclusive=True, group="monitor", exit_on_error=False)
    def follow_monitor(self) -> None:
        """Follow each daemon's monitor stream: one feed (on its own thread) per address of a
        route, through the route client's own per-address clients; one for a single daemon."""
        try:
            client = self.config.new_client()
        except SplitlmError as e:
            self.post_message(MonitorUnavailable(str(e)))
            return
        addresses = self.config.monitor_addresses
        members = list(getattr(client, "clients", ()))
        targets = members if len(addresses) > 1 and len(members) == len(addresses) else [client]

        def feed(i: int, target: Any) -> MonitorFeed:
            where = f"{addresses[i]}: " if len(targets) > 1 else ""
            return MonitorFeed(
                target,
                self.config.monitor_interval_s,
                on_sample=lambda s: self._post(MonitorSampled(s, i)),
                on_state=lambda state, detail: self._post(ConnectionChanged(state, detail, i)),
                on_unavailable=lambda reason: self._post(MonitorUnavailable(where + reason)),
            )

        self._feeds = [feed(i, t) for i, t in enumerate(targets)]
        threads = [threading.Thread(target=f.run, name=f"splitlm-monitor-{i}", daemon=True)
                   for i, f in enumerate(self._feeds[1:], 1)]
        try:
            for t in threads:
                t.start()
            self._feeds[0].run()
            for t in threads:
                t.join()
        finally:
            client.close()

    def on_monitor_sampled(self, msg: MonitorSampled) -> None:
        self.monitors[msg.index].add(msg.sample)
        self.monitor_samples += 1

    def on_monitor_unavailable(self, msg: MonitorUnavailable) -> None:
        self.monitor_note = msg.reason

    def _route_state(self, msg: ConnectionChanged) -> tuple[str, str]:
        """The route's state from each daemon's: the worst of them (down, reconnecting,
        connecting, connected), with the address of the daemon that makes it so when several."""
        self._feed_states[msg.index] = (msg.state, msg.detail)
        if len(self._feeds) <= 1:
            return msg.state, msg.detail
        order = (DOWN, RECONNECTING, CONNECTING, CONNECTED)
        states = [self._feed_states.get(i, (CONNECTING, "")) for i in range(len(self._feeds))]
        worst = min(range(len(states)), key=lambda i: order.index(states[i][0]))
        state, detail = states[worst]
        address = self.config.monitor_addresses[worst]
        return state, f"{address}: {detail}" if detail else detail

    def on_connection_changed(self, msg: ConnectionChanged) -> None:
        state, detail = self._route_state(msg)
        chat = self.chat_screen()
        if state == CONNECTED:
            self.monitor_note = ""
            if self._engine_down and chat is not None:
                chat.daemon_back()
            if not self._engine_down and not (chat and chat.starting):
                self.connection, self.connection_hint = CONNECTED, ""
            return
        if chat is not None and chat.generating:
            return  # the reply's own failover reports what happens to it
        self.connection = state
        self.connection_hint = RETRY_HINT if state == DOWN else ""
        self.monitor_note = f"monitor stream: {detail}" if detail else ""

    # --- actions ---

    def action_switch(self, name: str) -> None:
        """Show one of the installed screens over the chat (from any screen)."""
        if self.screen.id == f"{name}-screen":
            return
        while len(self.screen_stack) > 2:
            self.pop_screen()
        self.push_screen(name)

    async def action_back(self) -> None:
        if len(self.screen_stack) > 2:
            self.pop_screen()

    def action_settings(self) -> None:
        if isinstance(self.screen, SettingsScreen):
            return

        def done(settings: ChatSettings | None) -> None:
            if settings is not None:
                self.settings = settings
                self.show_draft(None)
                self.notify("settings saved", timeout=2)

        self.push_screen(SettingsScreen(self.settings, self.plan, self.config.trunk, self.engine), done)

    def action_open_conversation(self) -> None:
        chat = self.chat_screen()
        if chat is None or chat.generating or chat.pending or isinstance(self.screen, ConversationsScreen):
            return

        async def chosen(conversation_id: int | None) -> None:
            if conversation_id is not None and chat is not None:
                while len(self.screen_stack) > 2:
                    self.pop_screen()
                await chat.open_conversation(conversation_id)

        self.push_screen(ConversationsScreen(self.store), chosen)

    def action_retry(self) -> None:
        for feed in self._feeds:
            feed.retry_now()
        chat = self.chat_screen()
        if chat is not None:
            chat.retry()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "retry":
            chat = self.chat_screen()
            loading = chat is not None and chat.starting
            return (self.connection != CONNECTED or self._engine_down) and not loading
        if action == "switch" and parameters == ("compare",):
            return self.plan is not None and self.connection != DOWN
        return True

    def watch_connection(self) -> None:
        self._refresh_keys()

    def watch_plan_text(self) -> None:
        self._refresh_keys()

    def _refresh_keys(self) -> None:
        """The footer follows the state; a worker's late message while the app shuts down (no
        screen left) has no keys to refresh."""
        if self.screen_stack:
            self.refresh_bindings()

    # --- the command palette lists every key the footer shows ---

    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        seen = set()
        for active in screen.active_bindings.values():
            b = active.binding
            if not b.show or not b.description or b.action in seen or not active.enabled:
                continue
            seen.add(b.action)
            help_text = f"{self.get_key_display(b)} · {b.tooltip or b.description}"
            yield SystemCommand(b.description, help_text, partial(self.run_action, b.action, active.node))
