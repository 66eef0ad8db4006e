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


def test_every_data_file_is_package_data() -> None:
    """Files beside the modules (the chat app's .tcss, distill's prompt set) are declared as
    package data, so a wheel carries them."""
    import fnmatch

    tomllib = pytest.importorskip("tomllib")
    setuptools_cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_data: dict[str, list[str]] = setuptools_cfg["package-data"]
    missing = []
    for name, folder in setuptools_cfg["package-dir"].items():
        for f in (ROOT / folder).rglob("*"):
            if not f.is_file() or f.suffix in (".py", ".pyc") or "__pycache__" in f.parts:
                continue
            package = ".".join((name, *f.parent.relative_to(ROOT / folder).parts))
            patterns = package_data.get("*", []) + package_data.get(package, [])
            if not any(fnmatch.fnmatch(f.name, p) for p in patterns):
                missing.append(f"{package}: {f.name}")
    assert not missing, f"add to [tool.setuptools.package-data] in pyproject.toml: {missing}"
