"""`make lint` type-checks what STYLE.md asks (mypy strict on shared, daemon and tui, under their
installed names) and CI runs it before the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_make_lint_then_make_test() -> None:
    commands = [ln.strip() for ln in (ROOT / ".ci/run").read_text().splitlines()
                if ln.strip() and not ln.lstrip().startswith("#")]
    assert "make lint" in commands, ".ci/run must run `make lint`"
    assert commands[-1] == "make test", ".ci/run ends with the README's test command"
    assert commands.index("make lint") < len(commands) - 1


def test_make_lint_runs_ruff_mypy_and_the_proto_check() -> None:
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^lint:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert recipe, "Makefile has no lint target"
    body = recipe.group(1)
    for tool in ("ruff check", "mypy", "protos/generate.py --check"):
        assert tool in body, f"make lint does not run {tool}"


def test_mypy_is_strict_on_every_package_under_its_installed_name() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    mypy = pyproject["tool"]["mypy"]
    assert mypy["strict"] is True
    checked = set(mypy["packages"])
    for name in ("splitlm.shared", "splitlm.daemon", "splitlm.tui"):
        assert name in checked, f"[tool.mypy] packages lacks {name}"
    # nothing of ours is let off strict, apart from the generated protos
    for override in mypy.get("overrides", []):
        modules = override["module"] if isinstance(override["module"], list) else [override["module"]]
        ours = [m for m in modules if m.startswith("splitlm.")]
        assert all(m.startswith("splitlm.protos.") for m in ours), f"an override relaxes {ours}"
