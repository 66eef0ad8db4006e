"""The daemon down at start, and dying mid-reply: notices, the retry key, never a traceback."""

from __future__ import annotations

import time

from textual.widgets import Input

from splitlm.shared.failover import RetryPolicy
from splitlm.tui.app.app import SplitlmApp
from splitlm.tui.app.config import ChatSettings
from splitlm.tui.app.widgets.chat_message import ChatMessage
from splitlm.tui.app.widgets.latency_strip import LatencyStrip
from splitlm.tui.app.widgets.status_bar import StatusBar
from tests.conftest import start_daemon
from tests.tui.conftest import send, wait_loaded, wait_reply, wait_until

FAST_RETRY = RetryPolicy(initial_delay_s=0.1, max_delay_s=0.3, deadline_s=1.5)


def notices(app: SplitlmApp) -> list[str]:
    return [f"{n.title}: {n.message}" for n in app._notifications]


async def test_daemon_dying_mid_reply_keeps_the_partial_reply(daemon_factory, chat_model, make_config, tmp_path) -> None:  # type: ignore[no-untyped-def]
    d = daemon_factory(chat_model, "--split", "2:4")
    config = make_config(d.address, settings=ChatSettings(max_new_tokens=3000), retry=FAST_RETRY)
    app = SplitlmApp(config)
    states: list[str] = []
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_loaded(pilot, app)
        app.watch(app, "connection", lambda state: states.append(state))
        await send(pilot, app, "why is the sky blue")
        chat = app.chat_screen()
        strip = chat.query_one(LatencyStrip)
        await wait_until(pilot, lambda: strip.tokens >= 5, what="5 tokens")
        d.proc.kill()
        await wait_reply(pilot, app, 2, timeout=30)
        reply = chat.messages[-1]
        assert reply.finish_reason == "failed"
        assert reply.content and list(chat.query(ChatMessage))[-1].text == reply.content  # partial stays
        assert "reconnecting" in states and app.connection == "down"
        assert any(n.startswith("Lost the daemon") for n in notices(app)), notices(app)
        status = chat.query_one(StatusBar)
        assert status.state == "down" and "ctrl+y" in status.hint
        assert app.check_action("retry", ()) is True
        await pilot.press("ctrl+l")  # the app still works
        await wait_until(pilot, lambda: app.screen.id == "latency-screen", what="the latency screen")
        await pilot.press("escape")

        # the daemon comes back on the same address; the retry key reconnects and chat goes on
        d2 = start_daemon(chat_model, d.address, tmp_path / "back.log", "--split", "2:4")
        try:
            await pilot.press("ctrl+y")
            await wait_until(pilot, lambda: app.connection == "connected" and not chat.starting,
                             timeout=60, what="reconnected")
            app.settings = ChatSettings(max_new_tokens=8)
            await send(pilot, app, "and the sea")
            await wait_reply(pilot, app, 4)
            assert chat.messages[-1].finish_reason in ("length", "eos")
        finally:
            d2.stop()


async def test_escape_while_reconnecting_gives_up_at_once(daemon_factory, chat_model, make_config) -> None:  # type: ignore[no-untyped-def]
    """Esc stops a reconnect in progress (``RemoteSession.cancel``) instead of waiting out the
    retry deadline; the partial reply stays."""
    d = daemon_factory(chat_model, "--split", "2:4")
    patient = RetryPolicy(initial_delay_s=0.5, max_delay_s=1.0, deadline_s=120)
    config = make_config(d.address, settings=ChatSettings(max_new_tokens=3000), retry=patient)
    app = SplitlmApp(config)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_loaded(pilot, app)
        await send(pilot, app, "why is the sky blue")
        chat = app.chat_screen()
        strip = chat.query_one(LatencyStrip)
        await wait_until(pilot, lambda: strip.tokens >= 5, what="5 tokens")
        d.proc.kill()
        await wait_until(pilot, lambda: app.connection == "reconnecting", timeout=30, what="reconnecting")
        t0 = time.monotonic()
        await pilot.press("escape")
        await wait_reply(pilot, app, 2, timeout=15)
        assert time.monotonic() - t0 < 10  # not the 120 s retry deadline
        reply = chat.messages[-1]
        assert reply.finish_reason == "failed" and reply.content


async def test_daemon_down_at_start_then_up(chat_model, make_config, tmp_path) -> None:  # type: ignore[no-untyped-def]
    address = f"unix:{tmp_path / 'later.sock'}"
    app = SplitlmApp(make_config(address))
    async with app.run_test(size=(80, 24)) as pilot:
        chat = app.chat_screen()
        await wait_until(pilot, lambda: app.connection == "down", timeout=30, what="down")
        assert any(n.startswith("Not connected") for n in notices(app)), notices(app)
        assert not app.engine.loaded and chat.query_one(StatusBar).state == "down"
        await send(pilot, app, "hello")  # Enter retries the load; no daemon: the prompt comes back
        await wait_until(pilot, lambda: not chat.starting and not chat.pending, timeout=30, what="the retry")
        assert chat.messages == [] and chat.query_one("#prompt", Input).value == "hello"
        assert any("back in the box" in n for n in notices(app)), notices(app)
        d = start_daemon(chat_model, address, tmp_path / "d.log", "--split", "2:4")
        try:
            # the monitor stream sees the daemon and the chat loads by itself
            await wait_loaded(pilot, app, timeout=60)
            await wait_until(pilot, lambda: app.connection == "connected", what="connected")
        finally:
            d.stop()
