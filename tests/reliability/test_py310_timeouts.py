"""Python 3.10 is supported (``requires-python = ">=3.10"``), and on 3.10 ``asyncio.wait_for``
raises ``asyncio.TimeoutError``, which is *not* the builtin ``TimeoutError`` (it became an alias
in 3.11; ``concurrent.futures.TimeoutError`` likewise). An ``except TimeoutError`` around such a
wait catches nothing on 3.10: the batcher's window (``daemon/batcher.py``) then ended its whole
batch loop with the exception. The test suite runs on 3.11, where both spellings work, so this
check reads the source instead: a handler naming the bare builtin around an ``await``,
``wait_for`` or a ``.result(timeout)`` must spell it ``asyncio.TimeoutError`` (or the futures
one), which catches on 3.10 and is the same class from 3.11 on.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHECKED = ("daemon", "shared", "tui", "scripts", "tests")


def _names_bare_timeout(handler: ast.ExceptHandler) -> bool:
    types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(t, ast.Name) and t.id == "TimeoutError" for t in types)


def _waits(body: list[ast.stmt]) -> bool:
    """Whether a try body awaits, calls ``wait_for`` or a future's ``result``/``exception``."""
    for node in (n for stmt in body for n in ast.walk(stmt)):
        if isinstance(node, ast.Await):
            return True
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if name == "wait_for" or (name in ("result", "exception") and (node.args or node.keywords)):
                return True
    return False


def bare_timeouts(source: str) -> list[int]:
    """Lines of ``except TimeoutError`` handlers that do not catch on Python 3.10."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Try) and _waits(node.body):
            out += [h.lineno for h in node.handlers if h.type is not None and _names_bare_timeout(h)]
    return out


def test_no_bare_timeout_error_around_asyncio_waits() -> None:
    found = []
    for folder in CHECKED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT)
            found += [f"{rel}:{line}" for line in bare_timeouts(path.read_text(encoding="utf-8"))]
    assert not found, (
        "`except TimeoutError` around an asyncio wait does not catch on Python 3.10; write "
        "`except asyncio.TimeoutError` (the same class from 3.11 on): " + ", ".join(found)
    )


def test_the_check_sees_the_old_batcher_and_accepts_the_fix() -> None:
    old = (
        "async def f(e, left):\n"
        "    try:\n"
        "        await asyncio.wait_for(e.wait(), left)\n"
        "    except TimeoutError:\n"
        "        return\n"
    )
    assert bare_timeouts(old) == [4]
    assert bare_timeouts(old.replace("except TimeoutError", "except (OSError, TimeoutError)")) == [4]
    assert bare_timeouts(old.replace("except TimeoutError", "except asyncio.TimeoutError")) == []
    futures = "try:\n    fut.result(timeout=5)\nexcept TimeoutError:\n    pass\n"
    assert bare_timeouts(futures) == [3]
    # a plain socket timeout (OSError's TimeoutError on every version) is left alone
    assert bare_timeouts("try:\n    sock.recv(1)\nexcept TimeoutError:\n    pass\n") == []
