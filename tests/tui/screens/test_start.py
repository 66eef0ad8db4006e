"""A prompt sent while the chat loads its parts is held, sent once ready, and never lost.

The engine is the real one against a real daemon; only its start is held at a gate the test
opens, standing in for the 15-30 s a real model takes to load (so the test decides when the
load ends instead of racing it).
"""

from __future__ import annotations

import threading
from pathlib import Path

from textual.widgets import Input

from splitlm.shared.errors import SplitlmError
from splitlm.tui.app.app import SplitlmApp
from splitlm.tui.app.config import AppConfig, ChatSettings
from splitlm.tui.app.engine import LOAD_STEPS, ChatEngine, PlanInfo, Progress
from splitlm.tui.app.messages import EngineProgress
from splitlm.tui.app.screens.chat import PENDING_NOTE, ChatScreen
from splitlm.tui.app.widgets.chat_message import ChatMessage
from splitlm.tui.app.widgets.progress_panel import ProgressPanel
from splitlm.tui.app.widgets.status_bar import StatusBar
from tests.tui.conftest import send, wait_loaded, wait_reply, wait_until

PROMPT = "why is the sky blue"


class GatedEngine(ChatEngine):
    """The real engine, whose first load waits at ``gate`` (a slow disk the test controls)."""

    def __init__(self, config: AppConfig) -> None:
        super().__init__(config)
        self.gate = threading.Event()
        self.waiting = threading.Event()
        """Set once the load has reached the gate."""

    def load(self, progress: Progress) -> PlanInfo:
        self.waiting.set()
        if not self.gate.wait(60):
            raise SplitlmError("the test never opened the gate")
        return super().load(progress)


def gated_app(config: AppConfig) -> tuple[SplitlmApp, GatedEngine]:
    engine = GatedEngine(config)
    return SplitlmApp(config, start_monitor=False, engine=engine), engine


def notices(app: SplitlmApp) -> list[str]:
    return [f"{n.title}: {n.message}" for n in app._notifications]


def held(chat: ChatScreen) -> list[ChatMessage]:
    return list(chat.query(".-pending").results(ChatMessage))


def prompt_box(chat: ChatScreen) -> Input:
    return chat.query_one("#prompt", Input)


class TestHeldPrompt:
    async def test_enter_while_loading_holds_the_prompt_and_sends_it_when_ready(
        self, chat_daemon, make_config
    ) -> None:  # type: ignore[no-untyped-def]
        app, engine = gated_app(make_config(chat_daemon.address, settings=ChatSettings(max_new_tokens=12)))
        progress: list[EngineProgress] = []
        hook = lambda m: progress.append(m) if isinstance(m, EngineProgress) else None  # noqa: E731
        async with app.run_test(size=(80, 24), message_hook=hook) as pilot:
            chat = app.chat_screen()
            await wait_until(pilot, engine.waiting.is_set, what="the load to start")
            assert chat.starting and app.connection == "loading"
            assert chat.query_one(StatusBar).state == "loading"
            await send(pilot, app, PROMPT)  # once, while loading

            assert prompt_box(chat).value == ""  # the box is free again
            [waiting] = held(chat)
            assert waiting.text == PROMPT and waiting.note == PENDING_NOTE and "waiting for the model" in waiting.note
            assert chat.messages == [] and chat.pending == PROMPT  # not in the conversation yet
            assert not any("not connected" in n for n in notices(app)), notices(app)
            assert app.check_action("retry", ()) is False  # nothing to retry while it loads
            keys = {b.binding.description for b in chat.active_bindings.values()}
            assert "Take back" in keys and "Stop" not in keys

            engine.gate.set()
            await wait_reply(pilot, app, 2)  # no second Enter
            assert [m.role for m in chat.messages] == ["user", "assistant"]
            assert chat.messages[0].content == PROMPT and chat.messages[1].content
            assert held(chat) == [] and chat.pending == ""
            assert [w.text for w in chat.query(ChatMessage)] == [PROMPT, chat.messages[1].content]
            assert app.connection == "connected" and not chat.query_one(ProgressPanel).display
            assert prompt_box(chat).placeholder.startswith("Type a prompt")

        # the load said what it did, stage by stage, in order, up to ready
        steps = [(m.step, m.label) for m in progress]
        assert [s for s, _ in steps] == list(range(LOAD_STEPS + 1)), steps
        labels = " | ".join(label for _, label in steps)
        for stage in ("torch", "for its plan", "reading the model", "bottom [0, 2) and top [4,",
                      f"connecting to the trunk at {chat_daemon.address}", "ready"):
            assert stage in labels, labels

    async def test_esc_takes_the_prompt_back_and_the_load_goes_on(self, chat_daemon, make_config) -> None:  # type: ignore[no-untyped-def]
        app, engine = gated_app(make_config(chat_daemon.address, settings=ChatSettings(max_new_tokens=8)))
        async with app.run_test(size=(80, 24)) as pilot:
            chat = app.chat_screen()
            await wait_until(pilot, engine.waiting.is_set, what="the load to start")
            await send(pilot, app, PROMPT)
            assert len(held(chat)) == 1
            await pilot.press("escape")
            await wait_until(pilot, lambda: not held(chat), what="the held prompt to go")
            assert prompt_box(chat).value == PROMPT and chat.pending == "" and chat.messages == []

            engine.gate.set()
            await wait_loaded(pilot, app)
            await pilot.pause(0.2)
            assert chat.messages == [] and not chat.generating  # taken back: not sent
            assert prompt_box(chat).value == PROMPT
            prompt_box(chat).focus()
            await pilot.press("enter")  # now it goes at once
            await wait_reply(pilot, app, 2)
            assert chat.messages[0].content == PROMPT

    async def test_a_second_enter_keeps_the_second_prompt_in_the_box(self, chat_daemon, make_config) -> None:  # type: ignore[no-untyped-def]
        app, engine = gated_app(make_config(chat_daemon.address, settings=ChatSettings(max_new_tokens=8)))
        async with app.run_test(size=(80, 24)) as pilot:
            chat = app.chat_screen()
            await wait_until(pilot, engine.waiting.is_set, what="the load to start")
            await send(pilot, app, PROMPT)
            await send(pilot, app, "and the sea")
            assert chat.pending == PROMPT and len(held(chat)) == 1
            assert prompt_box(chat).value == "and the sea"
            assert any("already waiting" in n for n in notices(app)), notices(app)
            engine.gate.set()
            await wait_reply(pilot, app, 2)
            assert chat.messages[0].content == PROMPT and prompt_box(chat).value == "and the sea"

    async def test_ctrl_j_sends_like_enter(self, chat_daemon, make_config) -> None:  # type: ignore[no-untyped-def]
        """A terminal still in line mode (keys typed before the app starts) sends Enter as ctrl+j."""
        app, engine = gated_app(make_config(chat_daemon.address))
        async with app.run_test(size=(80, 24)) as pilot:
            chat = app.chat_screen()
            await wait_until(pilot, engine.waiting.is_set, what="the load to start")
            await pilot.press(*PROMPT, "ctrl+j")
            assert chat.pending == PROMPT and prompt_box(chat).value == ""
            engine.gate.set()


class TestFailedLoad:
    async def test_no_daemon_puts_the_prompt_back_with_the_error(self, make_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
        app, engine = gated_app(make_config(f"unix:{tmp_path / 'nobody.sock'}"))
        async with app.run_test(size=(80, 24)) as pilot:
            chat = app.chat_screen()
            await wait_until(pilot, engine.waiting.is_set, what="the load to start")
            await send(pilot, app, PROMPT)
            prompt_box(chat).insert_text_at_cursor("more")  # typed while it waits
            engine.gate.set()
            await wait_until(pilot, lambda: not chat.starting, timeout=30, what="the load to fail")
            assert held(chat) == [] and chat.pending == "" and chat.messages == []
            assert prompt_box(chat).value == f"{PROMPT} more"  # nothing lost, the held one first
            assert app.connection == "down"
            [notice] = [n for n in notices(app) if n.startswith("Not connected")]
            assert "back in the box" in notice and "nobody.sock" in notice

    async def test_a_model_mismatch_says_failed_not_down(self, chat_daemon, tiny_models, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
        config = AppConfig(
            trunk=chat_daemon.address, model=str(tiny_models["gpt2"]), data_dir=tmp_path / "data",
            log_file=tmp_path / "chat.log", animations=False,
        )
        app, engine = gated_app(config)
        async with app.run_test(size=(80, 24)) as pilot:
            chat = app.chat_screen()
            await wait_until(pilot, engine.waiting.is_set, what="the load to start")
            await send(pilot, app, PROMPT)
            engine.gate.set()
            await wait_until(pilot, lambda: not chat.starting, timeout=60, what="the load to fail")
            assert prompt_box(chat).value == PROMPT and chat.messages == []
            assert app.connection == "failed" and chat.query_one(StatusBar).state == "failed"
            assert any("back in the box" in n for n in notices(app)), notices(app)
