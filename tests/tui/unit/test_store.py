"""Saved conversations in SQLite."""

from __future__ import annotations

from pathlib import Path

import pytest

from splitlm.tui.app.config import ChatSettings
from splitlm.tui.app.store import ConversationStore
from splitlm.tui.app.turns import Message


def test_save_reopen_in_a_new_store(tmp_path: Path) -> None:
    db = tmp_path / "sub" / "c.sqlite3"
    store = ConversationStore(db)
    msgs = [Message("user", "hello"), Message("assistant", "hi **there**", "eos")]
    cid = store.save(None, "hello", ChatSettings(max_new_tokens=7, seed=3, system_prompt="be brief"), msgs)
    store.close()
    again = ConversationStore(db)
    loaded = again.load(cid)
    assert loaded.title == "hello"
    assert loaded.messages == tuple(msgs)
    assert loaded.settings == ChatSettings(max_new_tokens=7, seed=3, system_prompt="be brief")


def test_save_replaces_messages_and_lists_newest_first(tmp_path: Path) -> None:
    store = ConversationStore(tmp_path / "c.sqlite3")
    a = store.save(None, "a", ChatSettings(), [Message("user", "1")])
    b = store.save(None, "b", ChatSettings(), [Message("user", "2")])
    store.save(a, "a", ChatSettings(), [Message("user", "1"), Message("assistant", "x", "cancelled")])
    recent = store.recent()
    assert [c.id for c in recent] == [a, b]
    assert recent[0].messages == 2
    assert store.load(a).messages[-1].finish_reason == "cancelled"
    store.delete(a)
    assert [c.id for c in store.recent()] == [b]
    with pytest.raises(KeyError):
        store.load(a)
