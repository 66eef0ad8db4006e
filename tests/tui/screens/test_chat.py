"""The chat against a real daemon subprocess (tiny random Llama with a word tokenizer)."""

from __future__ import annotations

import json

from textual.widgets import Input

from splitlm.tui.app.app import SplitlmApp
from splitlm.tui.app.config import ChatSettings
from splitlm.tui.app.messages import ReplyToken
from splitlm.tui.app.widgets.chat_message import ChatMessage
from splitlm.tui.app.widgets.latency_strip import LatencyStrip
from tests.conftest import run_cli
from tests.tui.conftest import send, wait_loaded, wait_reply, wait_until

PROMPT = "why is the sky blue"


class TestSend:
    async def test_reply_streams_and_equals_splitlm_generate(self, chat_daemon, chat_model, make_config) -> None:  # type: ignore[no-untyped-def]
        r = run_cli("generate", "--trunk", chat_daemon.address, "--model", str(chat_model),
                    "--max-new-tokens", "24", "--json", PROMPT)
        assert r.returncode == 0, r.stderr
        want = json.loads(r.stdout)
        tokens: list[ReplyToken] = []
        app = SplitlmApp(make_config(chat_daemon.address, settings=ChatSettings(max_new_tokens=24)))
        async with app.run_test(size=(80, 24), message_hook=lambda m: tokens.append(m) if isinstance(m, ReplyToken) else None) as pilot:
            await wait_loaded(pilot, app)
            await send(pilot, app, PROMPT)
            await wait_reply(pilot, app, 2)
            chat = app.chat_screen()
            reply = chat.messages[-1]
            assert reply.role == "assistant" and reply.content == want["text"]
            assert [m.event.token_id for m in tokens] == want["token_ids"]  # streamed one by one
            widgets = list(chat.query(ChatMessage))
            assert widgets[-1].text == want["text"] and widgets[-2].text == PROMPT
            strip = chat.query_one(LatencyStrip)
            assert strip.tokens == len(want["token_ids"]) and "tok/s" in strip.figures()
            assert app.last_reply is not None and app.last_reply.stats.tokens == len(want["token_ids"])
            assert chat.query_one("#prompt", Input).value == ""


class TestEscape:
    async def test_esc_stops_a_long_reply_and_keeps_it(self, chat_daemon, make_config) -> None:  # type: ignore[no-untyped-def]
        app = SplitlmApp(make_config(chat_daemon.address, settings=ChatSettings(max_new_tokens=3000)))
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_loaded(pilot, app)
            await send(pilot, app, PROMPT)
            chat = app.chat_screen()
            strip = chat.query_one(LatencyStrip)
            await wait_until(pilot, lambda: strip.tokens >= 5, what="5 tokens")
            await pilot.press("escape")
            await wait_reply(pilot, app, 2)
            reply = chat.messages[-1]
            assert reply.finish_reason == "cancelled"
            assert 5 <= app.last_reply.stats.tokens < 3000
            assert reply.content and list(chat.query(ChatMessage))[-1].text == reply.content
            # the next turn continues the same session after the stopped reply
            app.settings = ChatSettings(max_new_tokens=8)
            await send(pilot, app, "and the sea")
            await wait_reply(pilot, app, 4)
            assert chat.messages[-1].role == "assistant"


class TestRegenerateEditReopen:
    async def test_regenerate_edit_and_reopen(self, chat_daemon, make_config, tmp_path) -> None:  # type: ignore[no-untyped-def]
        config = make_config(chat_daemon.address, settings=ChatSettings(max_new_tokens=16))
        app = SplitlmApp(config)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_loaded(pilot, app)
            chat = app.chat_screen()
            await send(pilot, app, PROMPT)
            await wait_reply(pilot, app, 2)
            first = chat.messages[-1].content
            await pilot.press("ctrl+r")
            await wait_until(pilot, lambda: chat.generating or len(chat.messages) == 2, what="regenerate")
            await wait_reply(pilot, app, 2)
            assert [m.role for m in chat.messages] == ["user", "assistant"]
            assert chat.messages[-1].content == first  # greedy: the same reply again
            assert app.engine.last_plan.start == 0  # the same steps as the first time

            await send(pilot, app, "and the sea")  # second turn: the session's cache is reused
            await wait_reply(pilot, app, 4)
            second = app.engine.last_plan
            assert second.start > 0 and second.full[: second.start] == tuple(app.engine.cached[: second.start])
            two_turns = [m.content for m in chat.messages]

            await pilot.press("ctrl+r")  # regenerate the second reply: the first turn stays cached
            await wait_until(pilot, lambda: chat.generating or len(chat.messages) == 4, what="regenerate")
            await wait_reply(pilot, app, 4)
            assert app.engine.last_plan.start == second.start > 0  # rolled back, not re-prefilled
            assert [m.content for m in chat.messages] == two_turns

            await pilot.press("ctrl+g")  # edit the last prompt: it comes back into the box
            prompt = chat.query_one("#prompt", Input)
            assert prompt.value == "and the sea" and chat.editing
            prompt.value = ""
            await pilot.press(*"and the sun", "enter")
            await wait_reply(pilot, app, 4)
            assert [m.content for m in chat.messages][:3] == [*two_turns[:2], "and the sun"]
            assert app.engine.last_plan.start == second.start  # rolled back to the replaced turn's start
            edited = [m.content for m in chat.messages]

        # a new app on the same data dir reopens the conversation; regenerating its last reply from
        # an empty cache gives what the incremental turns gave
        app2 = SplitlmApp(config)
        async with app2.run_test(size=(80, 24)) as pilot:
            await wait_loaded(pilot, app2)
            await pilot.press("ctrl+o")
            await wait_until(pilot, lambda: app2.screen.id == "conversations", what="the list")
            await pilot.press("enter")
            chat = app2.chat_screen()
            await wait_until(pilot, lambda: len(chat.messages) == 4, what="the reopened conversation")
            assert [m.content for m in chat.messages] == edited
            assert [w.text for w in chat.query(ChatMessage)] == edited
            await pilot.press("ctrl+r")
            await wait_until(pilot, lambda: chat.generating or len(chat.messages) == 4, what="regenerate")
            await wait_reply(pilot, app2, 4)
            assert app2.engine.last_plan.start == 0
            assert chat.messages[-1].content == edited[-1]


class TestKeys:
    async def test_every_footer_key_is_in_the_palette(self, chat_daemon, make_config) -> None:  # type: ignore[no-untyped-def]
        app = SplitlmApp(make_config(chat_daemon.address))
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_loaded(pilot, app)
            await send(pilot, app, PROMPT)
            await wait_reply(pilot, app, 2)
            titles = {c.title for c in app.get_system_commands(app.screen)}
            shown = {a.binding.description for a in app.screen.active_bindings.values()
                     if a.binding.show and a.enabled}
            assert {"New", "Regen", "Edit", "Open", "Settings", "Stats", "Server", "Compare"} <= shown
            assert shown <= titles
