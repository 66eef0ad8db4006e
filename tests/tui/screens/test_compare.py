"""Full vs split on the same prompt: 100% agreement on greedy."""

from __future__ import annotations

from textual.widgets import Input, Label

from splitlm.tui.app.app import SplitlmApp
from splitlm.tui.app.config import ChatSettings
from splitlm.tui.app.messages import CompareProgress
from splitlm.tui.app.widgets.compare_table import CompareTable
from tests.tui.conftest import wait_loaded, wait_until


async def test_compare_agrees_on_greedy(chat_daemon, make_config) -> None:  # type: ignore[no-untyped-def]
    app = SplitlmApp(make_config(chat_daemon.address, settings=ChatSettings(max_new_tokens=20)))
    progress: list[str] = []

    def hook(m: object) -> None:
        if isinstance(m, CompareProgress):
            progress.append(m.label)

    async with app.run_test(size=(120, 40), message_hook=hook) as pilot:
        await wait_loaded(pilot, app)
        await pilot.press("ctrl+f")
        await wait_until(pilot, lambda: app.screen.id == "compare-screen", what="the compare screen")
        screen = app.screen
        prompt = screen.query_one("#compare-prompt", Input)
        assert prompt.value  # a prompt is offered
        prompt.value = "why is the sky blue"
        await pilot.press("enter")
        await wait_until(pilot, lambda: screen.report is not None, timeout=90, what="the comparison")
        r = screen.report
        assert r.comparison.agreement.identical and r.comparison.agreement.full_tokens == 20
        assert r.comparison.full.text == r.comparison.split.text
        assert "100%" in str(screen.query_one("#compare-agreement", Label).render())
        rows = {row[0]: row for row in screen.query_one(CompareTable).rows}
        assert rows["tokens"][1:3] == ("20", "20") and rows["TTFT"][3].endswith("×")
        # the full model loaded first, with progress, then both runs reported theirs
        assert progress[0].startswith("loading the full model") and "full model loaded" in progress
        assert any(p.startswith("full: ") for p in progress) and any(p.startswith("split: ") for p in progress)
        progress.clear()
        loaded = app.comparer.full
        await pilot.press("enter")  # a second run reuses the full model
        await wait_until(pilot, lambda: not screen.running, timeout=90, what="the second comparison")
        assert app.comparer.full is loaded and screen.report.comparison.agreement.identical
        assert not any(p.startswith("loading the full model") for p in progress)  # loaded once
