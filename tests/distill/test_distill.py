"""``splitlm distill`` end to end on a tiny random Llama with a character tokenizer: a bridge
student, a kill (SIGKILL) and ``--resume``, a standalone student, and bad input (exit 2, nothing
written). Real processes; nothing asserts a time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from splitlm.tui import cli
from tests.conftest import run_cli

from .conftest import QUICK


def test_bridge_student_directory(bridge: Path) -> None:
    m = json.loads((bridge / "student.json").read_text())
    assert m["format"] == "splitlm-student" and m["kind"] == "bridge"
    assert m["plan"] == [1, 5] and m["layers"] == 2 and m["init_from"] == [1, 4]
    assert m["base"]["num_layers"] == 6 and m["base"]["config_digest"] and m["base"]["weights_digest"]
    t = m["training"]
    assert t["steps"] == 6 and t["tokens_seen"] == 6 * 2 * 16 and t["finished"] is True
    assert 0.0 <= t["acceptance"] <= 1.0 and 1.0 <= t["tokens_per_round_trip_k4"] <= 5.0
    assert t["step0_acceptance"] is not None  # the untrained student, evaluated before step 1
    # one weights file, the one the manifest names; the curve is a PNG
    assert [p.name for p in bridge.glob("weights-*.safetensors")] == [m["weights"]] == ["weights-000006.safetensors"]
    assert (bridge / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(bridge.glob(".*tmp*"))  # no temporary file left behind


def _checkpoint_step(out: Path) -> int:
    import torch

    return int(torch.load(out / "checkpoint.pt", weights_only=True)["state"]["step"])


def test_kill_then_resume_continues_the_step_count(tiny_text_models: dict[str, Path], text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["distill", "--model", str(tiny_text_models["llama"]), "--data", str(text_file), "--output", str(out),
            *QUICK, "--steps", "3000", "--checkpoint-every", "5", "--eval-every", "1000"]
    proc = subprocess.Popen([sys.executable, "-m", "splitlm.tui.cli", *args], stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "checkpoint at step" in line:
            os.kill(proc.pid, signal.SIGKILL)
            break
    assert proc.wait(60) == -signal.SIGKILL, "".join(seen)
    killed_at = _checkpoint_step(out)
    assert 5 <= killed_at < 3000
    manifest = json.loads((out / "student.json").read_text())
    assert manifest["training"]["finished"] is False and manifest["training"]["steps"] == killed_at
    data_before = (out / "data.json").read_bytes()

    # a checkpoint exists: starting afresh into the same directory is refused, nothing changes
    again = run_cli(*args)
    assert again.returncode == 2 and "--resume" in again.stderr and _checkpoint_step(out) == killed_at

    total = killed_at + 7
    r = run_cli(*args[:-6], "--steps", str(total), "--checkpoint-every", "5", "--eval-every", "3", "--resume", "--json")
    assert r.returncode == 0, r.stderr
    assert f"resuming {out} at step {killed_at}" in r.stderr
    s = json.loads(r.stdout)
    assert s["steps"] == total and s["tokens_seen"] == total * 2 * 16
    steps = [h["step"] for h in s["history"]]
    assert steps[0] == 0 and steps[-1] == total and steps == sorted(steps)
    assert (out / "data.json").read_bytes() == data_before
    assert json.loads((out / "student.json").read_text())["training"]["steps"] == total


def test_standalone_student_is_a_model_directory(tiny_text_models: dict[str, Path], text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "small"
    r = run_cli("distill", "--model", str(tiny_text_models["llama"]), "--data", str(text_file), "--output", str(out),
                "--standalone", "--layers", "3", "--seq-len", "16", "--steps", "2", "--threads", "1", "--hard-weight", "0.5")
    assert r.returncode == 0, r.stderr
    assert "standalone, 3 layers from [0, 2, 5]" in r.stdout
    m = json.loads((out / "student.json").read_text())
    assert m["kind"] == "standalone" and m["plan"] is None and m["weights"] == "model.safetensors"
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    # a normal model directory: --model takes it
    g = run_cli("generate", "--full", "--model", str(out), "--no-chat", "--max-new-tokens", "3", "--threads", "1",
                "--json", "abc")
    assert g.returncode == 0, g.stderr
    assert len(json.loads(g.stdout)["token_ids"]) <= 3
    # and --draft student: takes it (as a model draft, checked against the model it came from)
    import torch

    from splitlm.shared import prepare
    from splitlm.shared.draft.build import build_drafter
    from splitlm.shared.sampling import SamplingSettings

    drafter = build_drafter(f"student:{out}", prepare.load_model(str(tiny_text_models["llama"])), torch.device("cpu"))
    assert drafter is not None and drafter.name == f"student:{out}" and 0 < drafter.cost < 1
    assert len(drafter.propose([40, 41, 42], 3, SamplingSettings(), torch.Generator()).tokens) == 3


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", b"  \n\n", "is empty"),
        ("blob.bin", bytes(range(256)) * 4, "is not text"),
        ("latin1.txt", "caf\xe9 au lait".encode("latin-1"), "is not UTF-8"),
        ("rows.jsonl", b'{"text": "fine"}\n{"title": "no text"}\n', "line 2"),
        ("short.txt", b"abc", "at least 2"),
    ],
)
def test_bad_data_is_refused_and_nothing_is_written(
    tiny_text_models: dict[str, Path], tmp_path: Path, name: str, content: bytes, message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = tmp_path / name
    data.write_bytes(content)
    out = tmp_path / "out"
    code = cli.main(["distill", "--model", str(tiny_text_models["llama"]), "--data", str(data), "--output", str(out),
                     *QUICK, "--steps", "2"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and err.startswith("splitlm: error: --data")
    assert not out.exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_checkpoint_is_refused(
    bridge: Path, tiny_text_models: dict[str, Path], tmp_path: Path, damage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(bridge, out)
    ckpt = out / "checkpoint.pt"
    blob = ckpt.read_bytes()
    ckpt.write_bytes(blob[: len(blob) // 2] if damage == "truncated" else b"not a checkpoint" * 100)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code = cli.main(["distill", "--model", str(tiny_text_models["llama"]), "--output", str(out), "--resume", "--steps", "9"])
    err = capsys.readouterr().err
    assert code == 2 and "corrupt or truncated" in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_resume_needs_a_run_and_output_is_required(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["distill", "--output", str(tmp_path / "none"), "--resume"]) == 2
    assert "no checkpoint.pt" in capsys.readouterr().err
    assert cli.main(["distill"]) == 2
    assert "needs --output" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
