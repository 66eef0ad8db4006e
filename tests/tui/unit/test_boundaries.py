"""The rooms' import rule: ``tui`` and ``daemon`` never import each other (DESIGN.md), checked
in the source and in a live process that opens the chat app's modules."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def imported_modules(path: Path, package: str) -> set[str]:
    """Absolute names of everything ``path`` imports (relative imports resolved against
    ``package``, the module's own package)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                out.add(".".join([*base, node.module] if node.module else base))
            elif node.module:
                out.add(node.module)
    return out


def room_imports(folder: str, import_name: str) -> dict[str, set[str]]:
    found = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        rel = path.relative_to(ROOT / folder).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        package = ".".join([import_name, *parts[:-1]] if path.name != "__init__.py" else [import_name, *parts])
        found[str(path.relative_to(ROOT))] = imported_modules(path, package)
    return found


def test_relative_imports_resolve() -> None:
    tree = room_imports("tui", "splitlm.tui")
    assert "splitlm.shared.errors" in tree["tui/app/app.py"]  # from ...shared.errors import ...
    assert "splitlm.tui.app.engine" in tree["tui/app/app.py"]  # from .engine import ...


@pytest.mark.parametrize(("folder", "import_name", "forbidden"), [
    ("tui", "splitlm.tui", "splitlm.daemon"),
    ("daemon", "splitlm.daemon", "splitlm.tui"),
])
def test_rooms_do_not_import_each_other(folder: str, import_name: str, forbidden: str) -> None:
    bad = {f: sorted(m for m in mods if m == forbidden or m.startswith(forbidden + "."))
           for f, mods in room_imports(folder, import_name).items()}
    assert not {f: m for f, m in bad.items() if m}


def test_the_running_app_loads_no_daemon_module() -> None:
    code = (
        "import sys, splitlm.tui.cli, splitlm.tui.app.app, splitlm.tui.app.comparison\n"
        "bad = sorted(m for m in sys.modules if m.startswith('splitlm.daemon'))\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
