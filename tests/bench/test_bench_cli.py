"""``splitlm bench`` end to end on a tiny random Llama: its own daemon, an existing daemon
(``--trunk``), and argument errors. Real daemon processes, real sockets; nothing asserts a time."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run_cli

HIDDEN = 64  # tests/conftest.py tiny_config
SHORT = ("--split", "2:4", "--prompt-lengths", "8,24", "--new-tokens", "4", "--warmup", "1",
         "--repeats", "1", "--threads", "1")
SUMMARY_KEYS = {"full", "split", "agreement", "wire", "memory", "concurrency", "chat", "ratios", "goals"}
MODE_KEYS = {"per_token_p50_s", "per_token_p95_s", "tokens_per_s", "overhead_p50_s", "late_over_early",
             "by_prompt_length", "client_compute_p50_s", "trunk_compute_p50_s"}


def _check_common(doc: dict[str, Any], itemsize: int) -> None:
    assert set(doc) == {"meta", "summary", "samples", "plots"}
    s = doc["summary"]
    assert SUMMARY_KEYS <= set(s)
    assert MODE_KEYS <= set(s["full"]) and MODE_KEYS <= set(s["split"])
    assert sorted(s["split"]["by_prompt_length"]) == ["24", "8"]
    # greedy, same prompts: the split gives the full model's tokens, every run
    a = s["agreement"]
    assert a["runs"] == 2 and a["identical_runs"] == 2 and a["percent"] == 100.0
    # every raw sample is there: 2 lengths x 1 round x 2 modes, 4 tokens each
    single = doc["samples"]["single"]
    assert sorted((x["mode"], x["prompt_len"]) for x in single) == [
        ("full", 8), ("full", 24), ("split", 8), ("split", 24)]
    assert all(len(x["token_ids"]) == 4 and len(x["per_token_s"]) == 3 for x in single)
    # P3: a decode step carries the hidden state both ways plus framing, the same at any context
    w = s["wire"]
    assert w["payload_per_token"] == 2 * HIDDEN * itemsize
    assert w["flat_in_context"] is True
    assert 0 < w["framing_per_token"] <= 64
    assert w["per_generated_token"] == w["payload_per_token"] + w["framing_per_token"]
    split_steps = [b for x in single if x["mode"] == "split" for b in x["step_bytes"][1:]]
    assert set(split_steps) == {w["per_generated_token"]}
    assert all(b == 0 for x in single if x["mode"] == "full" for b in x["step_bytes"])
    for n, per in w["per_prompt_token"].items():  # a prefill of n positions: n hidden states each way
        assert 2 * HIDDEN * itemsize <= per <= 2 * HIDDEN * itemsize + 64 / int(n)
    r = s["ratios"]
    for key in ("per_token_p50_s", "tokens_per_s", "ttft_8", "ttft_24"):
        assert r[key] > 0, key
    assert [g["id"] for g in s["goals"]] == ["P1", "P1b", "P2", "P3", "P4", "P5", "P6", "P7", "P8"]
    assert {g["id"]: g["passed"] for g in s["goals"]}["P3"] is True
    assert s["split"]["trunk_compute_p50_s"] > 0 and s["full"]["trunk_compute_p50_s"] == 0
    assert s["memory"]["daemon_rss_bytes"] > 0


@pytest.mark.slow
def test_bench_with_its_own_daemon(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    out, plots, md = tmp_path / "b.json", tmp_path / "plots", tmp_path / "docs" / "results.md"
    md.parent.mkdir()
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps({"chat_tokens_per_s": 19.0, "generate_tokens_per_s": 20.0}))
    # --weights int8 reaches the daemon, the client side, the full model and the memory children: a
    # side left at float32 would refuse the session (the precision is part of the fingerprint)
    r = run_cli("bench", "--model", str(tiny_models["llama"]), *SHORT, "--concurrency", "1,2",
                "--weights", "int8", "--json", str(out), "--plots", str(plots),
                "--markdown", str(md), "--chat-json", str(chat), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    doc = json.loads(out.read_text())
    _check_common(doc, itemsize=4)
    meta, s = doc["meta"], doc["summary"]
    assert meta["daemon_exit_code"] == 0  # the bench stopped its daemon, and it exited cleanly
    # --threads 1 is the daemon's too when --daemon-threads is not given
    assert meta["settings"]["trunk"] is None and meta["threads"] == {"client": 1, "daemon": 1}
    assert meta["plan"]["split"] == [2, 4] and meta["plan"]["weights"] == "int8"
    assert meta["plan"]["wire_dtype"] == "float32"  # int8 weights, float32 hidden states
    # memory from fresh child processes: the client holds less than the full model, both loaded
    m = s["memory"]
    assert m["full_rss_bytes"] > m["baseline_rss_bytes"] > 0 and m["client_rss_bytes"] > 0
    assert s["ratios"]["client_rss_over_full_rss"] > 0
    conc = s["concurrency"]
    assert sorted(conc) == ["1", "2"]
    for n in ("1", "2"):
        for mode in ("full", "split"):
            row = conc[n][mode]
            assert row["tokens"] == int(n) * 4 and row["aggregate_tokens_per_s"] > 0
        assert conc[n]["ratio_aggregate"] > 0
    goals = {g["id"]: g for g in s["goals"]}
    assert goals["P7"]["value"] == pytest.approx(0.95) and goals["P7"]["passed"] is True
    assert goals["P6"]["passed"] is not None and goals["P5"]["passed"] is None  # no 8-session run
    # outputs: the table on stdout, the plots, the Markdown section linking them relative to it
    assert "split/full" in r.stdout and "P8" in r.stdout
    pngs = sorted(p.name for p in plots.glob("*.png"))
    assert pngs == ["breakdown.png", "concurrency.png", "per_token.png", "ttft.png"]
    assert all((plots / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)
    text = md.read_text()
    assert "| figure | full | split | split / full |" in text and "| P1 |" in text
    assert "](../plots/ttft.png)" in text
    assert text.startswith("<!-- splitlm-bench:begin") and text.rstrip().endswith("<!-- splitlm-bench:end -->")


@pytest.mark.slow
def test_bench_against_an_existing_daemon(  # type: ignore[no-untyped-def]
    tiny_models: dict[str, Path], daemon_factory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from splitlm.tui.cli import main

    d = daemon_factory(tiny_models["llama"], "--split", "2:4")
    out = tmp_path / "b.json"
    r = run_cli("bench", "--trunk", d.address, "--model", str(tiny_models["llama"]), *SHORT,
                "--concurrency", "3", "--wire-dtype", "bfloat16", "--no-memory", "--json", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(out.read_text())
    _check_common(doc, itemsize=2)  # --wire-dtype bfloat16 halves the payload
    assert doc["meta"]["settings"]["trunk"] == d.address and doc["meta"]["daemon_exit_code"] is None
    assert doc["meta"]["plan"]["wire_dtype"] == "bfloat16"
    assert doc["meta"]["plan"]["weights"] == "float32" and doc["meta"]["plan"]["batching"] is False
    assert doc["meta"]["daemon_batching"] == {"enabled": False, "batches": 0, "batched_steps": 0}
    assert "full_rss_bytes" not in doc["summary"]["memory"]
    assert d.proc.poll() is None  # not the bench's to stop
    # refusals, in-process (each before any weights load): a split or a weight precision that is
    # not the daemon's, settings of a daemon the bench does not start, a file without markers
    handwritten = tmp_path / "B.md"
    handwritten.write_text("# notes without markers\n")
    model = str(tiny_models["llama"])
    for argv, message in (
        (["--model", model, "--split", "1:3"], "serves layers 2:4"),
        (["--daemon-threads", "1"], "--daemon-threads sets the daemon the bench starts"),
        (["--batch"], "--batch sets the daemon the bench starts"),
        (["--model", model, "--weights", "bfloat16"], "the bench runs both sides at one precision"),
        (["--markdown", str(handwritten)], "refusing to overwrite"),
    ):
        assert main(["bench", "--trunk", d.address, *argv]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert handwritten.read_text() == "# notes without markers\n"
    assert d.proc.poll() is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt-lengths", "16,abc"], "--prompt-lengths: expected comma-separated integers"),
        (["--prompt-lengths", "0,16"], "--prompt-lengths: 0 is out of range"),
        (["--concurrency", "1,0"], "--concurrency: 0 is out of range"),
        (["--new-tokens", "1"], "--new-tokens: must be 2-4096"),
        (["--repeats", "x"], "--repeats: expected an integer"),
        (["--split", "2-4"], "--split: expected A:B"),
        (["--wire-dtype", "int4"], "--wire-dtype: invalid choice"),
        (["--weights", "float8"], "--weights: invalid choice"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    ],
)
def test_bad_arguments_exit_2_with_the_flag_named(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from splitlm.tui.cli import main  # in-process: argparse refuses before anything loads

    assert main(["bench", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_prompt_lengths_past_the_context_are_refused(
    tiny_models: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from splitlm.tui.cli import main

    # the tiny models have 256 positions: 300 + 4 cannot fit; refused before a daemon starts
    argv = ["bench", "--model", str(tiny_models["llama"]), "--split", "2:4", "--prompt-lengths", "300",
            "--new-tokens", "4", "--no-memory"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "none fits the context of 256 tokens" in err and "starting a trunk daemon" not in err, err
    assert "Traceback" not in err
