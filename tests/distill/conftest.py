"""A bridge student of the tiny Llama, made once per session by ``splitlm distill`` (in process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

TEXT = (
    "The quick brown fox jumps over the lazy dog. A split model runs its bottom and top here and "
    "its trunk on a server; drafts save round trips. "
) * 6
QUICK = ("--split", "1:5", "--layers", "2", "--seq-len", "16", "--batch-size", "2", "--threads", "1")
"""A bridge for the plan 1:5 (two layers replace four), short sequences."""


@pytest.fixture(scope="session")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("data") / "train.txt"
    p.write_text(TEXT)
    return p


@pytest.fixture(scope="session")
def bridge(tiny_text_models: dict[str, Path], text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bridge student of the tiny Llama for the plan 1:5, six steps."""
    import contextlib
    import io

    from splitlm.tui import cli

    out = tmp_path_factory.mktemp("students") / "bridge"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = cli.main(["distill", "--model", str(tiny_text_models["llama"]), "--data", str(text_file),
                         "--output", str(out), *QUICK, "--steps", "6", "--eval-every", "3",
                         "--checkpoint-every", "2", "--json"])
    assert code == 0
    summary = json.loads(stdout.getvalue())
    assert summary["steps"] == 6 and summary["kind"] == "bridge" and summary["finished"]
    return out
