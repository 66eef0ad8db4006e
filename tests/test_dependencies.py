"""Every third-party package the code imports is declared in pyproject.toml (core or an extra).

A package that only arrives as another one's dependency (tqdm through transformers) works until
that one drops it; so each import in the installed folders is mapped to its distribution and
looked up among the declared requirements.
"""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("protos", "shared", "daemon", "tui")
"""The design card's folders, installed as ``splitlm.*``; tests and scripts have the dev extra."""
OUTSIDE_MAKE_INSTALL = {"llama_cpp": ("llama-cpp-python", "peer")}
"""Imports of an extra that ``make install`` leaves out (built from source by ``make bench-peer``):
import name -> (distribution, the extra declaring it)."""


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> dict[str, str]:
    """Each declared distribution (canonical name) and where: ``core`` or the extra's name."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out: dict[str, str] = {}
    groups = {"core": project["dependencies"], **project["optional-dependencies"]}
    for group, reqs in groups.items():
        for req in reqs:
            out.setdefault(_canonical(re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0]), group)
    return out


def imported_top_levels() -> dict[str, Path]:
    """Top-level modules imported anywhere in the installed folders (absolute imports only)."""
    found: dict[str, Path] = {}
    for folder in FOLDERS:
        for path in (ROOT / folder).rglob("*.py"):
            if "splitlm/v1" in path.as_posix():  # generated
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], path)
    return found


def test_every_imported_package_is_declared() -> None:
    dists = packages_distributions()
    decl = declared()
    missing = []
    for top, where in sorted(imported_top_levels().items()):
        if top in sys.stdlib_module_names or top == "splitlm" or top in FOLDERS:
            continue
        if _canonical(top) in decl:  # e.g. tomli, imported (and installed) below 3.11 only
            continue
        if top in OUTSIDE_MAKE_INSTALL:  # maybe not installed here: declared where it says
            dist, extra = OUTSIDE_MAKE_INSTALL[top]
            assert decl.get(dist) == extra, f"{top}: {dist} is not declared in the {extra} extra"
            continue
        owners = {_canonical(d) for d in dists.get(top, [])}
        assert owners, f"{top} (imported in {where.relative_to(ROOT)}) is not installed here"
        if not owners & decl.keys():
            missing.append(f"{top} ({', '.join(sorted(owners))}), imported in {where.relative_to(ROOT)}")
    assert not missing, "imported but not declared in pyproject.toml: " + "; ".join(missing)


def test_metrics_and_bench_dependencies_are_where_the_readme_says() -> None:
    decl = declared()
    assert decl["prometheus-client"] == "daemon"  # `splitlm-trunkd --metrics`
    all_extra = {_canonical(re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0])
                 for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
                     "optional-dependencies"]["all"]}
    assert "prometheus-client" in all_extra
    assert decl["tqdm"] == "core"  # `splitlm bench` needs no extra for its progress bar
    # llama.cpp, the bench's peer: its own extra, built by `make bench-peer`, never by `make install`
    assert decl["llama-cpp-python"] == "peer" and "llama-cpp-python" not in all_extra
