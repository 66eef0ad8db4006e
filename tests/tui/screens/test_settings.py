"""The settings modal: edits apply, bad values are refused in place, the plan is read-only."""

from __future__ import annotations

from textual.widgets import Input, Label

from splitlm.tui.app.app import SplitlmApp
from tests.tui.conftest import wait_loaded, wait_until


async def test_settings_edit_and_plan(chat_daemon, make_config) -> None:  # type: ignore[no-untyped-def]
    app = SplitlmApp(make_config(chat_daemon.address))
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_loaded(pilot, app)
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: app.screen.id == "settings", what="the settings")
        screen = app.screen
        plan = " ".join(str(w.render()) for w in screen.query(".plan-line"))
        assert app.plan.fingerprint in plan and chat_daemon.address in plan and "[2, 4)" in plan
        screen.query_one("#set-top_p", Input).value = "2"
        await pilot.press("ctrl+s")
        assert app.screen is screen and "top-p" in str(screen.query_one("#settings-error", Label).render())
        screen.query_one("#set-top_p", Input).value = "0.9"
        screen.query_one("#set-max_new_tokens", Input).value = "5"
        screen.query_one("#set-seed", Input).value = "7"
        screen.query_one("#set-system_prompt", Input).value = "be small"
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: app.screen.id == "chat", what="back to the chat")
        s = app.settings
        assert (s.max_new_tokens, s.top_p, s.seed, s.system_prompt) == (5, 0.9, 7, "be small")
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: app.screen.id == "settings", what="the settings")
        await pilot.press("escape")
        await wait_until(pilot, lambda: app.screen.id == "chat", what="cancelled")
        assert app.settings == s
