"""``splitlm generate --batch FILE`` against a real daemon started with ``--batch``: each line's
greedy tokens equal ``splitlm generate`` for that prompt alone (with and without a draft), the
sessions' steps were batched by the daemon, results come in input order, a bad line is reported
with its line number while the others run, and the exit status says which happened."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from splitlm.shared.client import TrunkClient
from splitlm.tui import cli
from tests.conftest import run_cli

PROMPTS = ["hello there", "the quick brown fox", "abcabcabcabc", "split the model", "zz", "1 2 3 4 5 6"]
TOKENS = "10"


@pytest.fixture(autouse=True)
def _no_user_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))  # no user client.toml


def _generate(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``splitlm generate ARGV`` in this process (the command's own code path, without paying a
    process start per prompt): the exit status, standard output and standard error."""
    capsys.readouterr()
    rc = cli.main(["generate", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def test_batch_lines_equal_each_prompt_alone(tiny_text_models, daemon_factory, capsys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = tiny_text_models["llama"]
    d = daemon_factory(model, "--split", "1:5", "--batch", "--batch-window", "20ms")
    common = ["--trunk", d.address, "--model", str(model), "--no-chat", "--max-new-tokens", TOKENS]
    batch = tmp_path / "prompts.jsonl"
    batch.write_text("".join(json.dumps({"prompt": p, "id": f"p{i}"}) + "\n" for i, p in enumerate(PROMPTS)))

    for draft in ("off", "ngram"):
        alone = []
        for p in PROMPTS:  # one session at a time: nothing to batch
            rc, out, _ = _generate(capsys, *common, "--draft", draft, "--json", p)
            assert rc == 0
            alone.append(json.loads(out)["token_ids"])
        client = TrunkClient(d.address)
        before = client.info().batching.batches
        out_file = tmp_path / f"results-{draft}.jsonl"
        rc, out, _ = _generate(capsys, *common, "--draft", draft, "--batch", str(batch), "--concurrency", "6",
                            "--output", str(out_file))
        batches = client.info().batching.batches - before
        client.close()
        assert rc == 0 and out == ""
        results = _lines(out_file.read_text())
        assert [(r["line"], r["id"]) for r in results] == [(i + 1, f"p{i}") for i in range(len(PROMPTS))]
        assert [r["token_ids"] for r in results] == alone, draft
        assert batches > 0, "the concurrent sessions' steps were not batched"
        if draft == "off":
            alone_off = alone
        else:
            assert sum(r["draft"]["accepted"] for r in results) > 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp files left

    # a bad line in the middle, through the real command and standard input: reported with its line
    # number, the others run (in input order), exit status 1
    lines = [
        json.dumps({"prompt": PROMPTS[0], "id": "first"}),
        '{"prompt": "unterminated',
        json.dumps({"id": "no prompt"}),
        "",
        json.dumps({"prompt": PROMPTS[1], "top_p": 0}),
        json.dumps({"prompt": "x" * 300}),  # past the daemon's 256 positions: the trunk refuses it
        json.dumps({"prompt": PROMPTS[1], "max_new_tokens": 3, "id": 7}),
    ]
    r = run_cli("generate", *common, "--batch", "-", stdin="\n".join(lines) + "\n")
    assert r.returncode == 1, r.stderr
    results = _lines(r.stdout)
    assert [x["line"] for x in results] == [1, 2, 3, 5, 6, 7]
    first, bad_json, missing, bad_value, too_long, last = results
    assert first["token_ids"] == alone_off[0]
    assert bad_json["error"].startswith("not valid JSON")
    assert missing == {"line": 3, "id": "no prompt", "error": 'missing "prompt" (a string) or "messages"'}
    assert '"top_p" must be a number in (0, 1], got 0' in bad_value["error"]
    assert "256" in too_long["error"] and "token_ids" not in too_long
    assert last["id"] == 7 and last["token_ids"] == alone_off[1][: len(last["token_ids"])]
    assert len(last["token_ids"]) <= 3
    assert "6 lines, 4 failed" in r.stderr
    assert d.proc.poll() is None and "Traceback" not in d.log_text()


def test_usage_errors_exit_2_and_write_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "hi"}\n')
    out = tmp_path / "out.jsonl"
    cases = [
        (["--batch", str(tmp_path / "missing.jsonl")], "no such file"),
        (["--batch", str(empty)], "no prompts"),
        (["--batch", str(good), "a prompt too"], "not both"),
        (["--output", str(out), "a prompt"], "--output goes with --batch"),
        (["--batch", str(good), "--output", str(tmp_path / "no" / "dir.jsonl")], "cannot write there"),
        (["--batch", str(good), "--concurrency", "0"], "--concurrency"),
    ]
    for argv, words in cases:
        rc, stdout, err = _generate(capsys, "--trunk", f"unix:{tmp_path}/none.sock", *argv)
        assert rc == 2 and stdout == "", argv
        assert words in err, (argv, err)
    # no daemon there: a failure before any line ran (exit 1), and --output is not written
    rc, _, err = _generate(capsys, "--trunk", f"unix:{tmp_path}/none.sock", "--batch", str(good),
                           "--output", str(out))
    assert rc == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl", "good.jsonl"]


def test_full_batch_runs_here(tiny_text_models, capsys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``--full --batch``: no daemon; the lines run one at a time and equal ``--full`` alone."""
    common = ["--full", "--model", str(tiny_text_models["gpt2"]), "--no-chat", "--max-new-tokens", "6"]
    alone = [json.loads(_generate(capsys, *common, "--json", p)[1])["token_ids"] for p in PROMPTS[:2]]
    batch = tmp_path / "b.jsonl"
    batch.write_text(f'{json.dumps({"prompt": PROMPTS[0]})}\n{{"prompt": 1}}\n{json.dumps({"prompt": PROMPTS[1]})}\n')
    rc, out, err = _generate(capsys, *common, "--batch", str(batch), "--concurrency", "3")
    results = _lines(out)
    assert rc == 1 and "(1 at a time)" in err
    assert [r.get("token_ids") for r in results] == [alone[0], None, alone[1]]
    assert results[1] == {"line": 2, "id": None, "error": '"prompt" must be a non-empty string'}
