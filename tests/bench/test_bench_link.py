"""``splitlm bench --link-rtt``: the link rows end to end on a tiny Llama with a tokenizer (its own
daemon, a relay per RTT, drafts off and ngram), the pure figures, and argument errors. Lower
bounds only: nothing asserts that anything is fast."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from splitlm.tui.bench.link import BEGIN, END, LinkSample, schedule, summarise
from tests.conftest import run_cli

RTT_S = 0.02


@pytest.mark.slow
def test_bench_link_rows(tiny_text_models: dict[str, Path], tmp_path: Path) -> None:
    out, md = tmp_path / "link.json", tmp_path / "LINK.md"
    r = run_cli("bench", "--model", str(tiny_text_models["llama"]), "--split", "2:4", "--link-rtt", "0,20ms",
                "--drafts", "off,ngram", "--prompts", "1", "--new-tokens", "6", "--warmup", "0", "--threads", "1",
                "--json", str(out), "--markdown", str(md), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    # the table: one row per RTT, draft and prompt kind, and the goals
    assert "× no draft" in r.stdout and "goals (issue 12):" in r.stdout
    doc = json.loads(out.read_text())
    rows = doc["summary"]["rows"]
    assert [(x["rtt_ms"], x["kind"], x["draft"]) for x in rows] == [
        (rtt, kind, draft) for rtt in (0.0, 20.0) for kind in ("grounded", "chat", "code") for draft in ("off", "ngram")
    ]
    for x in rows:
        assert x["tokens_per_s"] > 0 and x["tokens_per_step"] > 0 and x["client_ms_per_token"] > 0
        assert x["vs_direct"] > 0
        if x["draft"] == "off":
            assert x["vs_no_draft"] == 1.0 and x["acceptance"] is None and x["tokens_per_step"] <= 1
        else:
            assert x["vs_no_draft"] > 0 and x["compared_tokens"] and x["same_tokens"] is not None
    samples = doc["samples"]["link"]
    assert len(samples) == 12 and all(s["tokens"] >= 1 and s["steps"] >= 1 for s in samples)
    for s in samples:
        if s["rtt_s"] == RTT_S:
            # every step crossed the relay there and back: the prefill's, and each decode step's
            assert s["ttft_s"] >= RTT_S
            assert s["decode_s"] >= RTT_S * (s["steps"] - 1)
    # the relay changes no token: without a draft, both RTTs generate the same replies
    plain = {(s["rtt_s"], s["prompt"]): s["token_ids"] for s in samples if s["draft"] == "off"}
    assert all(plain[(0.0, p)] == plain[(RTT_S, p)] for (_, p) in plain)
    assert doc["meta"]["daemon_exit_code"] == 0
    assert [g["goal"] for g in doc["summary"]["goals"]] == [">= 3", ">= 1.5", ">= 0.95"]
    text = md.read_text()
    assert text.startswith(BEGIN) and text.rstrip().endswith(END) and "| RTT ms | draft |" in text


def _sample(rtt: float, draft: str, prompt: str, tokens: int, decode_s: float, steps: int,
            drafted: int = 0, accepted: int = 0, ids: tuple[int, ...] = ()) -> LinkSample:
    return LinkSample(rtt, draft, "grounded", prompt, 0, 10, tokens, 0.1, decode_s, steps, drafted, accepted,
                      0.0, 0.01 * (tokens - 1), 0.02 * (tokens - 1), ids or tuple(range(tokens)))


def test_link_figures() -> None:
    s = summarise([
        _sample(0.05, "off", "a", 9, 0.8, 9),
        _sample(0.0, "off", "a", 9, 0.4, 9),
        _sample(0.05, "ngram", "a", 9, 0.2, 3, drafted=8, accepted=6, ids=(0, 1, 2, 3, 9, 9, 9, 9, 9)),
    ])
    off, ngram, direct = s["rows"]
    assert off["tokens_per_s"] == pytest.approx(10.0) and off["vs_no_draft"] == 1.0
    assert direct["tokens_per_s"] == pytest.approx(20.0) and direct["vs_direct"] == 1.0
    assert off["vs_direct"] == pytest.approx(0.5) and ngram["vs_direct"] == pytest.approx(2.0)
    assert ngram["tokens_per_s"] == pytest.approx(40.0) and ngram["vs_no_draft"] == pytest.approx(4.0)
    assert ngram["acceptance"] == pytest.approx(0.75) and ngram["tokens_per_step"] == pytest.approx(3.0)
    assert ngram["client_ms_per_token"] == pytest.approx(10.0)
    assert (ngram["same_tokens"], ngram["compared_tokens"]) == (4, 9)
    grounded, chat, zero = s["goals"]
    assert grounded["value"] == pytest.approx(4.0) and grounded["passed"] is True
    assert chat["passed"] is None and zero["passed"] is None  # no student draft, no draft at 0 ms


def test_link_schedule_rotates_the_drafts() -> None:
    runs = schedule(2, ["off", "ngram", "model:x"], warmup=1, repeats=1)
    assert runs == [(-1, 0, "off"), (-1, 0, "ngram"), (-1, 0, "model:x"),
                    (0, 0, "off"), (0, 0, "ngram"), (0, 0, "model:x"),
                    (0, 1, "ngram"), (0, 1, "model:x"), (0, 1, "off")]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--link-rtt", "50"], "--link-rtt: expected comma-separated durations from 0 to 10 s"),
        (["--link-rtt", "5,fast"], "--link-rtt: expected comma-separated durations"),
        (["--drafts", "off,telepathy"], "--drafts: expected comma-separated drafts"),
        (["--prompt-kinds", "grounded,poetry"], "--prompt-kinds: expected comma-separated prompt kinds"),
        (["--link-bandwidth", "fast"], "--link-bandwidth: expected bytes per second"),
        (["--link-bandwidth", "1MB/s"], "--link-bandwidth caps the relay of --link-rtt"),
        (["--link-rtt", "5ms", "--plots", "/tmp/nowhere"], "--plots belongs to the full/split tables"),
    ],
)
def test_bad_link_arguments_exit_2(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    from splitlm.tui.cli import main  # in-process: refused before anything loads

    assert main(["bench", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_link_rtt_values_read_with_the_last_unit() -> None:
    from splitlm.shared.config import ByteRate, Durations

    assert Durations(0, 10)("0,5,20,50,100ms") == (0.0, 0.005, 0.02, 0.05, 0.1)
    assert Durations(0, 10)("0.1s,20ms") == (0.02, 0.1)
    assert Durations(0, 10).show((0.0, 0.05)) == "0ms,50ms"
    assert ByteRate(1)("1MB/s") == 10**6 and ByteRate(1)("2048") == 2048


def test_the_table_names_a_draft_by_its_last_path_part() -> None:
    from splitlm.tui.bench.link import short_draft

    assert short_draft("student:/work/x/smollm2-bridge/") == "student:smollm2-bridge"
    assert short_draft("model:smollm2") == "model:smollm2" and short_draft("ngram:2") == "ngram:2"
