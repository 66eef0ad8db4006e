"""pyproject.toml lists every package folder, so a normal (non-editable) install is complete."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    setuptools_cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_dir: dict[str, str] = setuptools_cfg["package-dir"]
    listed = set(setuptools_cfg["packages"])
    on_disk = set()
    for name, folder in package_dir.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            on_disk.add(".".join((name, *rel.parts)))
    missing = sorted(on_disk - listed)
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {missing}"
    gone = sorted(listed - on_disk)
    assert not gone, f"listed in pyproject.toml but no __init__.py on disk: {gone}"
