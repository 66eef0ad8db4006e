"""``scripts/bench_start.py --quick`` on the bundled model (a tiny random one has no tokenizer to
generate with): every warm row measured, the table and JSON written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_start.py"


@pytest.mark.slow
@pytest.mark.realmodel
def test_quick_run_measures_every_warm_row(tmp_path: Path) -> None:
    out = tmp_path / "start.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--model", "smollm2", "--json", str(out)],
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
