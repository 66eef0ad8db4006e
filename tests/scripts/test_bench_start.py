"""``scripts/bench_start.py --quick`` on a tiny model with a tokenizer (the script's own figures
are SmolLM2's, from ``make bench``; this checks that every warm row is measured and the table and
JSON are written)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_start.py"


@pytest.mark.slow
def test_quick_run_measures_every_warm_row(tiny_text_models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "start.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--model", str(tiny_text_models["llama"]), "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert set(rows) == {
        "import torch, transformers", "generate --full, warm", "daemon to serving, warm", "generate, warm"
    }
    for name, row in rows.items():
        assert 0 < row["median_s"] < 600, name
        assert name in proc.stdout
