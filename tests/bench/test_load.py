"""``splitlm bench --load``: the load generator against a real tiny-model daemon writes its rows
(JSON keys as BENCHMARKS.md documents them); misplaced options are refused. Nothing asserts a time."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import run_cli

ROW_KEYS = {
    "mode", "sessions", "prefill_positions", "steps_per_session", "wall_s", "positions_per_s", "step_p50_ms",
    "step_p95_ms", "step_max_ms", "batches", "batched_steps", "mean_batch_rows", "prefills", "prefill_p50_ms",
    "client_cpu_s", "daemon_cpu_s", "scaling_vs_one",
}


def test_load_rows_against_a_daemon(tiny_models: dict[str, Path], daemon_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    d = daemon_factory(tiny_models["llama"], "--split", "2:4", "--batch")
    out = tmp_path / "load.json"
    r = run_cli("bench", "--trunk", d.address, "--load", "1,2", "--load-steps", "3", "--load-prefill", "40",
                "--json", str(out))
    assert r.returncode == 0, r.stderr
    assert "positions/s" in r.stdout and "batch" in r.stdout
    doc = json.loads(out.read_text())
    assert set(doc) == {"meta", "load"}
    assert {"command", "settings", "plan", "machine"} <= set(doc["meta"])
    rows = doc["load"]
    assert all(set(row) == ROW_KEYS for row in rows)
    # one row per count, and again beside the long prefill; the daemon at --trunk batches
    assert sorted((row["sessions"], row["prefill_positions"]) for row in rows) == [(1, 0), (1, 40), (2, 0), (2, 40)]
    assert {row["mode"] for row in rows} == {"batch"}
    assert all(row["positions_per_s"] > 0 and row["step_p95_ms"] >= row["step_p50_ms"] > 0 for row in rows)
    assert all(row["prefills"] >= 1 for row in rows if row["prefill_positions"])
    assert [row["scaling_vs_one"] for row in rows if row["sessions"] == 1 and not row["prefill_positions"]] == [1.0]
    assert all(row["daemon_cpu_s"] is None for row in rows)  # not the bench's own process to read


def test_load_refuses_the_other_rows_options(tmp_path: Path) -> None:
    r = run_cli("bench", "--trunk", "unix:/nonexistent.sock", "--load", "2", "--markdown", str(tmp_path / "B.md"))
    assert r.returncode == 2 and "--load measures the daemon alone" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("bench", "--load", "0")
    assert r.returncode == 2 and "--load" in r.stderr
