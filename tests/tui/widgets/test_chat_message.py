"""ChatMessage: buffered streaming into Markdown, and the final text."""

from __future__ import annotations

from textual.app import App, ComposeResult
from textual.widgets import Markdown

from splitlm.tui.app.widgets.chat_message import ChatMessage
from tests.tui.conftest import wait_until


class Host(App[None]):
    def compose(self) -> ComposeResult:
        yield ChatMessage("assistant", "", flush_interval_s=0.05)


class TestStreaming:
    async def test_deltas_reach_the_markdown_on_the_timer(self) -> None:
        app = Host()
        async with app.run_test() as pilot:
            msg = app.query_one(ChatMessage)
            for d in ["The **sky", "** is", " blue", "\n\n- one", "\n- two"]:
                msg.append(d)
            assert msg.text == "The **sky** is blue\n\n- one\n- two"
            md = msg.query_one(Markdown)
            await wait_until(pilot, lambda: md.source == msg.text, what="the flush")
            await msg.finish(note="· done")
            assert md.source == msg.text and msg.note == "· done"
            assert msg._timer is None

    async def test_finish_shows_text_held_back_at_the_end(self) -> None:
        app = Host()
        async with app.run_test():
            msg = app.query_one(ChatMessage)
            msg.append("hello wor")
            await msg.finish("hello world")
            assert msg.text == "hello world" and msg.query_one(Markdown).source == "hello world"

    async def test_a_prompt_is_plain_text(self) -> None:
        class PromptHost(App[None]):
            def compose(self) -> ComposeResult:
                yield ChatMessage("user", "[b]not markup[/b] *nor markdown*")

        app = PromptHost()
        async with app.run_test():
            body = app.query_one(".message-body")
            assert str(body.render()) == "[b]not markup[/b] *nor markdown*"
