"""Snapshots of the main screens at 80x24 and 120x40, fed fixed data (no daemon, no clock):
animations and the cursor blink are off, so the pictures are stable.

Update after a deliberate change with ``pytest tests/tui/test_snapshots.py --snapshot-update``
and look at the report before committing the new SVGs.
"""

from __future__ import annotations

import pytest

from splitlm.tui.app.app import SplitlmApp
from splitlm.tui.app.config import AppConfig, ChatSettings
from splitlm.tui.app.messages import CompareDone, EngineProgress, EngineReady, MonitorSampled
from splitlm.tui.app.widgets.latency_strip import LatencyStrip
from tests.tui import fakes

SIZES = [pytest.param((80, 24), id="80x24"), pytest.param((120, 40), id="120x40")]


def fixed_app(tmp_path) -> SplitlmApp:  # type: ignore[no-untyped-def]
    config = AppConfig(
        trunk=fakes.PLAN.address, model="smollm2", data_dir=tmp_path, log_file=tmp_path / "chat.log",
        animations=False, settings=ChatSettings(max_new_tokens=256, draft=fakes.DRAFT),
    )
    return SplitlmApp(config, start_monitor=False, autoload=False)


async def prepare(pilot) -> None:  # type: ignore[no-untyped-def]
    app: SplitlmApp = pilot.app
    chat = app.chat_screen()
    chat.post_message(EngineReady(fakes.PLAN))
    await chat.show_conversation(None, fakes.CONVERSATION)
    out = fakes.outcome()
    strip = chat.query_one(LatencyStrip)
    for i, t in enumerate(out.stats.timings):
        strip.record(i, t.latency_s)
    strip.refresh_figures()
    app.reply_finished(out)
    for i in range(90):
        app.post_message(MonitorSampled(fakes.sample(i, gpus=True)))
    await pilot.pause()


@pytest.mark.parametrize("size", SIZES)
def test_chat(snap_compare, tmp_path, size) -> None:  # type: ignore[no-untyped-def]
    assert snap_compare(fixed_app(tmp_path), terminal_size=size, run_before=prepare)


@pytest.mark.parametrize("size", SIZES)
def test_latency(snap_compare, tmp_path, size) -> None:  # type: ignore[no-untyped-def]
    assert snap_compare(fixed_app(tmp_path), press=["ctrl+l"], terminal_size=size, run_before=prepare)


@pytest.mark.parametrize("size", SIZES)
def test_server(snap_compare, tmp_path, size) -> None:  # type: ignore[no-untyped-def]
    async def run_before(pilot) -> None:  # type: ignore[no-untyped-def]
        await prepare(pilot)
        await pilot.press("ctrl+t")
        await pilot.pause()

    assert snap_compare(fixed_app(tmp_path), terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", SIZES)
def test_compare(snap_compare, tmp_path, size) -> None:  # type: ignore[no-untyped-def]
    async def run_before(pilot) -> None:  # type: ignore[no-untyped-def]
        await prepare(pilot)
        await pilot.press("ctrl+f")
        await pilot.pause()
        pilot.app.screen.post_message(CompareDone(fakes.report()))
        await pilot.pause()

    assert snap_compare(fixed_app(tmp_path), terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", SIZES)
def test_settings(snap_compare, tmp_path, size) -> None:  # type: ignore[no-untyped-def]
    assert snap_compare(fixed_app(tmp_path), press=["ctrl+s"], terminal_size=size, run_before=prepare)


@pytest.mark.parametrize("size", SIZES)
def test_loading_with_a_held_prompt(snap_compare, tmp_path, size) -> None:  # type: ignore[no-untyped-def]
    """The start: the load's stage and progress, and a prompt sent meanwhile, marked as waiting."""

    async def run_before(pilot) -> None:  # type: ignore[no-untyped-def]
        app: SplitlmApp = pilot.app
        chat = app.chat_screen()
        chat.starting = True  # as ``start_load`` leaves it, without a worker
        app.engine_loading(reconnecting=False)
        chat.post_message(EngineProgress("loading the bottom [0, 2) and top [28, 30) weights", 3, 5))
        await pilot.press(*"Why is the sky blue?", "enter")
        await pilot.pause()

    assert snap_compare(fixed_app(tmp_path), terminal_size=size, run_before=run_before)
