"""Saved conversations: one SQLite file under the data dir (platformdirs' user data dir, or
``--data-dir``). Used from the UI thread only; every write is one short transaction.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .config import ChatSettings
from .turns import Message

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY,
    title TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    settings TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    finish_reason TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (conversation_id, seq)
);
"""


@dataclass(frozen=True)
class ConversationSummary:
    """A row of the conversation list."""

    id: int
    title: str
    updated: float
    messages: int


@dataclass(frozen=True)
class StoredConversation:
    id: int
    title: str
    settings: ChatSettings
    messages: tuple[Message, ...]


class ConversationStore:
    """Conversations and their messages.

    Args:
        path: the database file; its folder is created.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(str(path))
        self.db.execute("PRAGMA foreign_keys = ON")
        self.db.executescript(SCHEMA)
        log.info("conversations in %s", path)

    def save(
        self, conversation_id: int | None, title: str, settings: ChatSettings, messages: Sequence[Message]
    ) -> int:
        """Create or replace a conversation whole (they are small); returns its id."""
        now = time.time()
        with self.db:
            if conversation_id is None:
                cur = self.db.execute(
                    "INSERT INTO conversations (title, created, updated, settings) VALUES (?, ?, ?, ?)",
                    (title, now, now, json.dumps(settings.to_dict())),
                )
                conversation_id = int(cur.lastrowid or 0)
            else:
                self.db.execute(
                    "UPDATE conversations SET title = ?, updated = ?, settings = ? WHERE id = ?",
                    (title, now, json.dumps(settings.to_dict()), conversation_id),
                )
                self.db.execute("DELETE FROM messages WHERE conversation_id = ?", (conversation_id,))
            self.db.executemany(
                "INSERT INTO messages (conversation_id, seq, role, content, finish_reason) VALUES (?, ?, ?, ?, ?)",
                [(conversation_id, i, m.role, m.content, m.finish_reason) for i, m in enumerate(messages)],
            )
        return conversation_id

    def recent(self, limit: int = 200) -> list[ConversationSummary]:
        rows = self.db.execute(
            "SELECT c.id, c.title, c.updated, COUNT(m.seq) FROM conversations c "
            "LEFT JOIN messages m ON m.conversation_id = c.id GROUP BY c.id "
            "ORDER BY c.updated DESC, c.id DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [ConversationSummary(int(i), str(t), float(u), int(n)) for i, t, u, n in rows]

    def load(self, conversation_id: int) -> StoredConversation:
        """Raises ``KeyError`` for an unknown id."""
        row = self.db.execute(
            "SELECT title, settings FROM conversations WHERE id = ?", (conversation_id,)
        ).fetchone()
        if row is None:
            raise KeyError(conversation_id)
        msgs = self.db.execute(
            "SELECT role, content, finish_reason FROM messages WHERE conversation_id = ? ORDER BY seq",
            (conversation_id,),
        ).fetchall()
        settings = ChatSettings.from_dict(json.loads(row[1]))
        return StoredConversation(
            conversation_id, str(row[0]), settings, tuple(Message(r, c, f) for r, c, f in msgs)
        )

    def delete(self, conversation_id: int) -> None:
        with self.db:
            self.db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    def close(self) -> None:
        self.db.close()
