"""The rooms' import rules (DESIGN.md), every one of them, checked on the source: ``protos``
imports nothing of ours, ``shared`` never imports ``daemon`` or ``tui``, ``daemon`` never imports
``tui``, ``tui`` never imports ``daemon``. Every import counts: module level, inside functions
(the lazy ones) and under ``TYPE_CHECKING``. Direct imports are enough: with no forbidden edge
anywhere, no chain of imports can reach a forbidden room either."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

ROOMS = {"protos": "splitlm.protos", "shared": "splitlm.shared", "daemon": "splitlm.daemon", "tui": "splitlm.tui"}
"""Folder -> import name (pyproject.toml's package-dir)."""

FORBIDDEN = {
    "protos": ("splitlm.shared", "splitlm.daemon", "splitlm.tui"),
    "shared": ("splitlm.daemon", "splitlm.tui"),
    "daemon": ("splitlm.tui",),
    "tui": ("splitlm.daemon",),
}
"""What each room must not import (DESIGN.md's "may import" column, inverted)."""


def imported_modules(source: str, package: str, filename: str = "<source>") -> set[str]:
    """Absolute names of everything ``source`` imports (relative imports resolved against
    ``package``, the module's own package), with ``from M import N`` giving ``M`` and ``M.N``."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            out.add(module)
            # ``from splitlm import daemon``: a name may be a module too
            out.update(f"{module}.{a.name}" for a in node.names)
    return out


def room_imports(folder: str, root: Path = ROOT) -> dict[str, set[str]]:
    """``{file: modules it imports}`` for every ``.py`` file of a room."""
    import_name = ROOMS[folder]
    found = {}
    for path in sorted((root / folder).rglob("*.py")):
        rel = path.relative_to(root / folder).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        package = ".".join([import_name, *parts[:-1]] if path.name != "__init__.py" else [import_name, *parts])
        found[str(path.relative_to(root))] = imported_modules(path.read_text(), package, str(path))
    return found


def violations(folder: str, root: Path = ROOT) -> dict[str, list[str]]:
    """Per file of ``folder``, the forbidden modules it imports (only files with some)."""
    bad = {}
    for f, mods in room_imports(folder, root).items():
        hits = sorted(m for m in mods for room in FORBIDDEN[folder] if m == room or m.startswith(room + "."))
        if hits:
            bad[f] = hits
    return bad


def test_relative_imports_resolve() -> None:
    tree = room_imports("tui")
    assert "splitlm.shared.errors" in tree["tui/app/app.py"]  # from ...shared.errors import ...
    assert "splitlm.tui.app.engine" in tree["tui/app/app.py"]  # from .engine import ...
    assert "splitlm.protos.splitlm.v1.trunk_pb2" in room_imports("protos")["protos/splitlm/v1/trunk_pb2_grpc.py"]


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_room_keeps_its_import_rule(folder: str) -> None:
    assert violations(folder) == {}


@pytest.mark.parametrize(("file", "line"), [
    ("shared/x.py", "from ..daemon.metrics import StepRecorder"),
    ("shared/x.py", "from ..tui import cli"),
    ("shared/models/x.py", "from ... import daemon"),
    ("daemon/x.py", "import splitlm.tui.app"),
    ("tui/app/x.py", "from ...daemon import cli"),
    ("tui/x.py", "from splitlm import daemon"),
    ("protos/x.py", "from ..shared import codec"),
])
def test_a_forbidden_import_is_caught_even_in_a_function(tmp_path: Path, file: str, line: str) -> None:
    path = tmp_path / file
    path.parent.mkdir(parents=True)
    path.write_text(f"def lazy() -> None:\n    {line}\n")
    assert list(violations(file.split("/")[0], tmp_path)) == [file]
