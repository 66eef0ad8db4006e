"""The draft in the chat app, against a real daemon subprocess: chosen in the settings screen,
applied from the next reply, its tokens per round trip and acceptance live in the status bar;
a draft that cannot be built is refused in place and the old one stays."""

from __future__ import annotations

import json
import re

from textual.widgets import Input, Label, Select

from splitlm.tui.app.app import SplitlmApp
from splitlm.tui.app.config import ChatSettings
from splitlm.tui.app.messages import ReplyToken
from splitlm.tui.app.screens.latency import LatencyScreen
from splitlm.tui.app.stats import DraftFigures
from splitlm.tui.app.widgets.compare_table import CompareTable
from splitlm.tui.app.widgets.figures import Figures
from splitlm.tui.app.widgets.status_bar import StatusBar
from tests.conftest import run_cli
from tests.tui.conftest import send, wait_loaded, wait_reply, wait_until

PROMPT = "one two three one two three one two three"
"""Repeats itself, and the tiny random model soon repeats its own tokens: prompt lookup finds
continuations the model accepts."""


def status_text(app: SplitlmApp) -> str:
    return str(app.screen.query_one(StatusBar).render())


async def choose_draft(pilot, app: SplitlmApp, kind: str, path: str = "") -> str:  # type: ignore[no-untyped-def]
    """Open the settings, pick ``kind`` in the draft select with the keyboard, type ``path``,
    and press ctrl+s (as a person would). Returns what the path box held after the pick."""
    await pilot.press("ctrl+s")
    await wait_until(pilot, lambda: app.screen.id == "settings", what="the settings")
    select = app.screen.query_one("#set-draft-kind", Select)
    select.focus()
    await pilot.press("enter")  # opens the list
    await pilot.pause()
    kinds = ["off", "ngram", "model", "student"]
    steps = kinds.index(kind) - kinds.index(str(select.value))
    await pilot.press(*(["down"] * steps if steps > 0 else ["up"] * -steps), "enter")
    await wait_until(pilot, lambda: select.value == kind, what=f"the draft select to show {kind}")
    target = app.screen.query_one("#set-draft-target", Input)
    await pilot.pause()
    after_pick = target.value
    if path:
        target.focus()
        target.value = ""
        await pilot.press(*path)
    await pilot.press("ctrl+s")
    return after_pick


async def test_ngram_chosen_in_settings_shows_tokens_per_round_trip(chat_daemon, chat_model, make_config) -> None:  # type: ignore[no-untyped-def]
    r = run_cli("generate", "--trunk", chat_daemon.address, "--model", str(chat_model), "--max-new-tokens", "32",
                "--draft", "ngram", "--json", PROMPT)
    assert r.returncode == 0, r.stderr
    want = json.loads(r.stdout)
    app = SplitlmApp(make_config(chat_daemon.address, settings=ChatSettings(max_new_tokens=32)))
    events: list[ReplyToken] = []
    hook = lambda m: events.append(m) if isinstance(m, ReplyToken) else None  # noqa: E731
    async with app.run_test(size=(80, 24), message_hook=hook) as pilot:
        await wait_loaded(pilot, app)
        assert "draft" not in status_text(app)  # no draft: nothing draft-related
        await choose_draft(pilot, app, "ngram")
        await wait_until(pilot, lambda: app.screen.id == "chat", what="back to the chat")
        assert app.settings.draft == "ngram" and "draft ngram" in status_text(app)
        await send(pilot, app, PROMPT)
        await wait_reply(pilot, app, 2)
        out = app.last_reply
        assert out is not None and out.draft == "ngram"
        res = out.result
        # the same reply, in the same round trips, as `splitlm generate --draft ngram`
        assert res.token_ids == want["token_ids"] and res.steps == want["draft"]["steps"], (res, want)
        assert res.tokens_per_step > 1 and res.accepted > 0
        # what the status bar showed while streaming is counted as the end result is
        live = [DraftFigures.of_event("ngram", m.event) for m in events]
        assert live[-1] == DraftFigures.of_result("ngram", res)
        assert [f.tokens for f in live] == list(range(1, len(res.token_ids) + 1))
        assert max(f.steps for f in live) < len(res.token_ids)
        status = status_text(app)
        m = re.search(r"draft ngram (\d+\.\d+) tok/trip (\d+)% acc", status)
        assert m, status
        assert float(m[1]) > 1 and float(m[1]) == round(res.tokens_per_step, 2)
        assert int(m[2]) == round(100 * res.accepted / res.drafted)
        first = app.engine.drafter
        # the latency screen's figures
        await pilot.press("ctrl+l")
        await wait_until(pilot, lambda: isinstance(app.screen, LatencyScreen), what="the latency screen")
        figures = app.screen.query_one(Figures)
        assert figures.value("round trips") == f"{res.steps} ({res.tokens_per_step:.2f} tok/trip)"
        assert f"{res.accepted} of {res.drafted} kept" in (figures.value("draft") or "")
        await pilot.press("escape")
        # the next reply reuses the drafter; turning the draft off closes it
        await send(pilot, app, "the sky is blue")
        await wait_reply(pilot, app, 4)
        assert app.engine.drafter is first
        await choose_draft(pilot, app, "off")
        await wait_until(pilot, lambda: app.screen.id == "chat", what="back to the chat")
        assert "draft" not in status_text(app)
        await send(pilot, app, "blue")
        await wait_reply(pilot, app, 6)
        assert app.engine.drafter is None and app.last_reply.result.drafted == 0


async def test_bad_draft_path_is_refused_in_place_and_the_old_draft_stays(chat_daemon, tmp_path, make_config) -> None:  # type: ignore[no-untyped-def]
    app = SplitlmApp(make_config(chat_daemon.address, settings=ChatSettings(max_new_tokens=8, draft="ngram:2")))
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_loaded(pilot, app)
        assert "draft ngram:2" in status_text(app)  # the start-up draft (--draft)
        await send(pilot, app, PROMPT)
        await wait_reply(pilot, app, 2)
        assert app.engine.draft_in_use == "ngram:2"
        drafter = app.engine.drafter
        missing = tmp_path / "no-such-draft"
        assert await choose_draft(pilot, app, "model", str(missing)) == ""  # ngram's "2" is no path
        screen = app.screen
        error = screen.query_one("#settings-error", Label)
        await wait_until(pilot, lambda: "no-such-draft" in str(error.render()) and not screen.checking,
                         what="the inline error")
        assert app.screen is screen  # still open, the error in place
        # an empty path is refused by the parser, before anything is built
        screen.query_one("#set-draft-target", Input).value = ""
        await pilot.press("ctrl+s")
        assert app.screen is screen and "needs a path" in str(error.render())
        await pilot.press("escape")
        await wait_until(pilot, lambda: app.screen.id == "chat", what="cancelled")
        assert app.settings.draft == "ngram:2" and "draft ngram:2" in status_text(app)
        await send(pilot, app, "the sky is blue")
        await wait_reply(pilot, app, 4)
        assert app.engine.drafter is drafter and app.last_reply.draft == "ngram:2"


async def test_compare_runs_both_sides_with_the_draft(chat_daemon, make_config) -> None:  # type: ignore[no-untyped-def]
    app = SplitlmApp(make_config(chat_daemon.address, settings=ChatSettings(max_new_tokens=24, draft="ngram")))
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_loaded(pilot, app)
        await pilot.press("ctrl+f")
        await wait_until(pilot, lambda: app.screen.id == "compare-screen", what="the compare screen")
        screen = app.screen
        screen.query_one("#compare-prompt", Input).value = PROMPT
        await pilot.press("enter")
        await wait_until(pilot, lambda: screen.report is not None, timeout=90, what="the comparison")
        r = screen.report
        full, split = r.comparison.full, r.comparison.split
        # the same drafts verified in the same chunks: the same tokens, steps and acceptance
        assert r.draft == "ngram" and r.comparison.agreement.identical
        assert split.accepted > 0 and (full.steps, full.drafted, full.accepted) == (split.steps, split.drafted, split.accepted)
        drafters = app.comparer._drafters
        assert drafters is not None and drafters[1]["full"] is not drafters[1]["split"]  # one per side
        rows = {row[0]: row for row in screen.query_one(CompareTable).rows}
        assert rows["tokens/trip (ngram)"][1:3] == (f"{split.tokens_per_step:.2f}",) * 2
        assert rows["draft accepted"][2] == f"{100 * split.accepted / split.drafted:.0f}%"


async def test_a_start_up_draft_that_cannot_load_is_told_and_the_reply_still_comes(chat_daemon, tmp_path, make_config) -> None:  # type: ignore[no-untyped-def]
    """``--draft model:PATH`` is only parsed at start; the first reply builds it. Refused, the
    reply goes on without it, the user is told, and the setting falls back to what was used."""
    missing = f"model:{tmp_path / 'gone'}"
    app = SplitlmApp(make_config(chat_daemon.address, settings=ChatSettings(max_new_tokens=6, draft=missing)))
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_loaded(pilot, app)
        assert "draft model" in status_text(app)
        await send(pilot, app, "why is the sky blue")
        await wait_reply(pilot, app, 2)
        out = app.last_reply
        assert out is not None and out.refused_draft == missing and "gone" in out.draft_error
        assert out.draft == "off" and out.result.drafted == 0 and len(out.result.token_ids) == 6
        assert app.settings.draft == "off" and "draft" not in status_text(app)
        assert any(n.title == "Draft refused" and "gone" in n.message for n in app._notifications)


async def test_a_model_draft_chosen_in_settings_is_built_there_and_used(chat_daemon, chat_model, make_config) -> None:  # type: ignore[no-untyped-def]
    """``model:PATH`` (the served model itself, the one small model at hand) is built by the
    settings screen's worker before it closes, and the next reply drafts with it."""
    app = SplitlmApp(make_config(chat_daemon.address, settings=ChatSettings(max_new_tokens=16)))
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_loaded(pilot, app)
        await choose_draft(pilot, app, "model", str(chat_model))
        await wait_until(pilot, lambda: app.screen.id == "chat", timeout=60, what="the draft built, back to the chat")
        assert app.settings.draft == f"model:{chat_model}" and "draft model" in status_text(app)
        staged = app.engine._staged  # built by the settings screen, waiting for the next reply
        assert staged is not None and staged[0] == app.settings.draft_spec() and staged[1] is not None
        # the served model drafting for itself costs a whole step per token, which the length
        # control rightly never pays for next to the daemon: declare it free to see it used
        staged[1].cost = 0.0
        await send(pilot, app, PROMPT)
        await wait_reply(pilot, app, 2)
        out = app.last_reply
        assert out.draft == f"model:{chat_model}" and not out.draft_error
        assert app.engine.drafter is staged[1] and app.engine._staged is None
        # the served model drafting for itself: what it drafts, it keeps
        res = out.result
        assert res.drafted > 0 and res.accepted == res.drafted and res.steps < len(res.token_ids)
        assert "100% acc" in status_text(app)
