"""``splitlm bench --precisions``: a daemon per precision, real processes, on a tiny random Llama;
its options and refusals. Nothing asserts a time."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from splitlm.tui.bench import precisions
from splitlm.tui.bench.options import BenchOptions, add_arguments
from tests.conftest import run_cli


def _opts(*argv: str) -> BenchOptions:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return BenchOptions.from_args(p.parse_args(list(argv)), None)


def test_the_sweep_has_its_own_cheap_defaults() -> None:
    o = _opts("--precisions", "int8,float32,int8")
    assert o.precisions == ("int8", "float32") and o.prompt_lengths == (16, 256)
    assert (o.new_tokens, o.repeats, o.peer) == (32, 1, "auto")
    o = _opts("--precisions", "float32", "--prompt-lengths", "8", "--repeats", "2", "--peer", "off")
    assert (o.prompt_lengths, o.repeats, o.peer) == ((8,), 2, "off")
    assert _opts().precisions is None and _opts().repeats == 3  # the tables' defaults are untouched


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--precisions", "float32,float8"], "--precisions: expected comma-separated precisions of float32"),
        (["--precisions", "float32", "--weights", "int8"], "--weights does not go with it"),
        (["--precisions", "float32", "--trunk", "unix:/nowhere"], "--trunk does not go with it"),
        (["--peer", "ollama"], "--peer: invalid choice"),
    ],
)
def test_refusals_exit_2_before_anything_loads(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from splitlm.tui.cli import main

    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and "starting a trunk daemon" not in err, err


def test_peer_llama_cpp_is_refused_where_it_cannot_run(
    tiny_models: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Without llama-cpp-python: refused before anything loads; with it, a model that is not a
    GGUF file is refused before the timed runs. Exit 2 either way, saying why."""
    from splitlm.tui.cli import main

    argv = ["bench", "--model", str(tiny_models["llama"]), "--split", "2:4", "--prompt-lengths", "8",
            "--new-tokens", "2", "--warmup", "0", "--repeats", "1", "--threads", "1", "--concurrency", "1",
            "--no-memory", "--peer", "llama.cpp"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--peer llama.cpp: " in err and ("make bench-peer" in err or "GGUF files only" in err), err
    assert "Traceback" not in err


@pytest.mark.slow
def test_float32_and_bfloat16_in_one_run(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    out, md = tmp_path / "p.json", tmp_path / "B.md"
    md.write_text(f"# hand\n\n{precisions.BEGIN}\nold\n{precisions.END}\ntail\n")
    r = run_cli("bench", "--model", str(tiny_models["llama"]), "--split", "2:4", "--precisions", "float32,bfloat16",
                "--prompt-lengths", "8", "--new-tokens", "4", "--warmup", "0", "--threads", "1", "--no-memory",
                "--peer", "off", "--json", str(out), "--markdown", str(md), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(out.read_text())
    ps = {p["precision"]: p for p in doc["summary"]["precisions"]}
    assert list(ps) == ["float32", "bfloat16"]
    assert doc["meta"]["daemon_exit_codes"] == {"float32": 0, "bfloat16": 0}
    f32, bf16 = ps["float32"], ps["bfloat16"]
    # bytes per token at each precision: bf16 reads half of float32's, and the parts add up
    assert 2 * bf16["bytes_per_token"]["full"]["weights"] == f32["bytes_per_token"]["full"]["weights"]
    for p in (f32, bf16):
        b = p["bytes_per_token"]
        assert b["client"]["weights"] + b["trunk"]["weights"] == b["full"]["weights"]
        assert p["full_over_floor"] > 0 and p["split_over_floor"] > 0 and p["client_over_floor"] > 0
        assert p["split_agreement_percent"] == 100.0  # split = full at every precision
        assert p["daemon_rss_bytes"] > 0 and p["full_rss_bytes"] is None  # --no-memory
    assert f32["agreement_with_float32_percent"] == 100.0  # float32 is its own reference
    assert 0 <= bf16["agreement_with_float32_percent"] <= 100
    assert sorted(doc["samples"]) == ["bfloat16", "float32"] and len(doc["samples"]["bfloat16"]) == 2
    assert doc["summary"]["bandwidth"]["bytes_per_s"] > 0
    assert "float32" in r.stdout and "/ floor" in r.stdout
    text = md.read_text()
    assert text.startswith("# hand\n") and text.endswith("tail\n") and "old" not in text
    assert "| figure | float32 | bfloat16 |" in text and "| split = full at this precision | 100.0 % | 100.0 % |" in text
