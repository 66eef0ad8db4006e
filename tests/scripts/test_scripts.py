"""Every script in ``scripts/`` still starts: its ``--help`` runs, and every name it imports from
``splitlm`` or ``_common`` (at the top or inside a function) exists.

The scripts are measurements that run for minutes, so the suite does not run them whole (one has
its own quick mode, ``test_bench_start.py``); this catches what breaks them silently when the
package moves on: a renamed module or a removed helper.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
PY_SCRIPTS = sorted(p for p in SCRIPTS.glob("*.py") if p.name != "_common.py")


def imported_names(path: Path) -> list[tuple[str, str]]:
    """``(module, name)`` for each ``from splitlm... import name`` / ``from _common import name``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "_common" or node.module.startswith("splitlm"):
                out += [(node.module, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(a.name, "") for a in node.names if a.name.startswith("splitlm")]
    return out


@pytest.mark.parametrize("script", PY_SCRIPTS + [SCRIPTS / "_common.py"], ids=lambda p: p.name)
def test_every_imported_name_exists(script: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(SCRIPTS))
    for module, name in imported_names(script):
        mod = importlib.import_module(module)
        if name:
            assert has_name(mod, name), f"{script.name} imports {name} from {module}, which has no such name"


def has_name(mod: object, name: str) -> bool:
    """``from mod import name`` works: an attribute, or a submodule of a package."""
    if hasattr(mod, name):
        return True
    try:
        return importlib.util.find_spec(f"{getattr(mod, '__name__', '')}.{name}") is not None
    except ModuleNotFoundError:  # mod is no package
        return False


def test_the_detector_sees_a_missing_name(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from _common import no_such_helper\n")
    assert imported_names(bad) == [("_common", "no_such_helper")]
    sys.path.insert(0, str(SCRIPTS))
    try:
        assert not has_name(importlib.import_module("_common"), "no_such_helper")
        assert has_name(importlib.import_module("_common"), "stop")
        assert has_name(importlib.import_module("splitlm.shared"), "launcher")
    finally:
        sys.path.remove(str(SCRIPTS))


@pytest.mark.parametrize("script", PY_SCRIPTS, ids=lambda p: p.name)
def test_help_runs(script: Path) -> None:
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout
