"""The bench's pure parts: run order, prompts, summaries and goals, on hand-made samples."""

from __future__ import annotations

import math
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints, is_typeddict

import pytest

from splitlm.tui.bench import report
from splitlm.tui.bench.measure import ConcurrencySample, RunSample, single_schedule
from splitlm.tui.bench.prompts import prompt_of_length
from splitlm.tui.bench.summary import ChatFigures, Memory, Summary


def _sample(mode: str, n: int, lat: float, rnd: int = 0, tokens: tuple[int, ...] = (5, 6, 7)) -> RunSample:
    k = len(tokens)
    trunk = 0.004 if mode == "split" else 0.0
    return RunSample(mode, rnd, n, ttft_s=lat * n, per_token_s=(lat,) * (k - 1),
                     client_s=(0.005,) * k, trunk_s=(trunk,) * k,
                     step_bytes=((2 * 8 * 4 * n + 57,) + (2 * 8 * 4 + 57,) * (k - 1)) if mode == "split" else (0,) * k,
                     token_ids=tokens)


def test_schedule_alternates_and_flips_who_goes_first() -> None:
    s = single_schedule([16, 64], warmup=1, repeats=2)
    assert s[:4] == [(-1, 16, "split"), (-1, 16, "full"), (-1, 64, "split"), (-1, 64, "full")]
    assert s[4:8] == [(0, 16, "full"), (0, 16, "split"), (0, 64, "full"), (0, 64, "split")]
    assert [r for r, _, _ in s].count(1) == 4 and len(s) == 12


def test_prompts_have_exact_lengths_without_a_tokenizer() -> None:
    for n in (1, 16, 1024):
        ids = prompt_of_length(None, 320, n)
        assert len(ids) == n and all(3 <= i < 320 for i in ids)
    assert prompt_of_length(None, 320, 16) == prompt_of_length(None, 320, 64)[:16]


def test_summary_ratios_wire_and_goals() -> None:
    samples = [_sample("full", 16, 0.010), _sample("split", 16, 0.0102), _sample("full", 512, 0.012),
               _sample("split", 512, 0.0125, tokens=(5, 6, 8))]
    conc = [ConcurrencySample("split", 1, 1.0, 10, (10.0,)), ConcurrencySample("split", 8, 1.0, 45, (5.6,) * 8),
            ConcurrencySample("full", 1, 1.0, 12, (12.0,)), ConcurrencySample("full", 8, 2.0, 96, (6.0,) * 8)]
    memory = {"full_rss_bytes": 1000, "client_rss_bytes": 550, "daemon_rss_bytes": 700}
    s = report.summarise(samples, conc, hidden=8, itemsize=4, memory=memory, chat={"ratio": 0.9})
    assert s["agreement"] == {"runs": 2, "identical_runs": 1, "tokens": 6, "matching_tokens": 5,
                              "percent": pytest.approx(500 / 6)}
    assert s["wire"]["per_generated_token"] == 2 * 8 * 4 + 57 and s["wire"]["framing_per_token"] == 57
    assert s["ratios"]["ttft_512"] == pytest.approx(0.0125 / 0.012)
    assert s["concurrency"]["8"]["split"]["scaling_vs_one"] == pytest.approx(4.5)
    assert s["concurrency"]["8"]["ratio_aggregate"] == pytest.approx(45 / 48)
    g = {x["id"]: x for x in s["goals"]}
    assert g["P2"]["figure"].startswith("TTFT (512-token")
    assert g["P3"]["passed"] is True and g["P5"]["passed"] is True and g["P6"]["passed"] is True
    assert g["P7"]["passed"] is False
    assert g["P4"]["value"] == pytest.approx(0.0125 / 0.0102)
    # split overhead: latency - client - trunk = 10.2 - 5 - 4 ms at ctx 16, 12.5 - 5 - 4 at 512
    assert s["split"]["overhead_p95_s"] == pytest.approx(0.0035)
    # two runs at 1.2 ms, two at 3.5: the median of an even count is the mean of the middle two
    assert s["split"]["overhead_p50_s"] == pytest.approx((0.0012 + 0.0035) / 2)
    text = report.text_table(s, "t")
    assert "P5" in text and "miss" in text and "pass" in text
    md = report.markdown(s, _meta(), {"TTFT": "bench/ttft.png"})
    assert "![TTFT](bench/ttft.png)" in md and "| P8 |" in md


def test_missing_figures_are_not_measured_not_failed() -> None:
    samples = [_sample("full", 16, 0.01), _sample("split", 16, 0.01)]
    s = report.summarise(samples, [], hidden=8, itemsize=4, memory={}, chat=None)
    g = {x["id"]: x for x in s["goals"]}
    for gid in ("P5", "P6", "P7"):
        assert g[gid]["passed"] is None and g[gid]["shown"] == "not measured"
    assert math.isnan(s["ratios"].get("client_rss_over_full_rss", math.nan))


def test_chat_json_forms(tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / "c.json"
    p.write_text('{"ratio": 0.97}')
    assert report.read_chat(p)["ratio"] == 0.97  # type: ignore[index]
    p.write_text('{"chat_tokens_per_s": 10, "generate_tokens_per_s": 20}')
    assert report.read_chat(p)["ratio"] == 0.5  # type: ignore[index]
    p.write_text('{"app_tokens_per_s_median": 19.0, "headless_tokens_per_s_median": 20.0, '
                 '"app_over_headless": 0.95}')  # scripts/bench_chat.py --json
    assert report.read_chat(p)["ratio"] == 0.95  # type: ignore[index]
    p.write_text('{"app_tokens_per_s_median": 19.0, "headless_tokens_per_s_median": 20.0, '
                 '"app_over_headless": 0.95, "idle_cpu_percent_of_one_core": {"chat_screen": 0.7}, '
                 '"idle_window_s": {"chat_screen": 30}}')
    chat = report.read_chat(p)
    assert chat is not None
    text = report.chat_text(chat)
    assert "19.0 tokens/s against 20.0" in text and "0.7 % on the chat screen (30 s)" in text
    p.write_text('{"tokens": 3}')
    with pytest.raises(ValueError, match="expected"):
        report.read_chat(p)


def _meta() -> dict:  # type: ignore[type-arg]
    return {
        "command": "splitlm bench --quick", "started": "2026-11-25 10:00 UTC", "elapsed_s": 1.0,
        "settings": {"weights": None, "trunk": None, "repeats": 1, "warmup": 1, "new_tokens": 3,
                     "concurrency": [1, 8], "quick": True},
        "prompt_lengths": [16, 512],
        "plan": {"model": "m", "layers": 6, "hidden_size": 8, "split": [2, 4], "dtype": "float32",
                 "wire_dtype": "float32"},
        "threads": {"client": 1, "daemon": "default"},
        "machine": {"cpus": 2, "torch": "2", "python": "3.11"},
    }


def test_markdown_is_spliced_between_the_markers() -> None:
    doc = f"# Title\nhandwritten\n{report.BEGIN}\nold results\n{report.END}\n## History\nkept\n"
    out = report.splice(doc, "new results\n")
    assert out == f"# Title\nhandwritten\n{report.BEGIN}\nnew results\n{report.END}\n## History\nkept\n"
    assert report.splice(out, "again") == out.replace("new results", "again")
    assert report.splice(None, "x") == f"{report.BEGIN}\nx\n{report.END}\n"
    with pytest.raises(ValueError, match="markers"):
        report.splice("# a file without markers\n", "x")


def _conforms(value: object, tp: Any, where: str) -> None:
    """``value`` has the shape ``tp`` (a TypedDict, dict/list/tuple of, a union, a plain type)."""
    if is_typeddict(tp):
        assert isinstance(value, dict), where
        hints = get_type_hints(tp)
        assert set(value) <= set(hints), f"{where}: {sorted(set(value) - set(hints))} not in {tp.__name__}"
        assert tp.__required_keys__ <= set(value), f"{where}: {sorted(tp.__required_keys__ - set(value))} missing"
        for k, v in value.items():
            _conforms(v, hints[k], f"{where}.{k}")
        return
    origin, args = get_origin(tp), get_args(tp)
    if origin is dict:
        assert isinstance(value, dict), where
        for k, v in value.items():
            assert isinstance(k, str), where
            _conforms(v, args[1], f"{where}[{k}]")
    elif origin is list:
        assert isinstance(value, list), where
        for i, v in enumerate(value):
            _conforms(v, args[0], f"{where}[{i}]")
    elif origin in (Union, UnionType):
        errors = []
        for arm in args:
            try:
                _conforms(value, arm, where)
                return
            except AssertionError as e:
                errors.append(str(e))
        raise AssertionError(f"{where}: {value!r} fits none of {tp}: {errors}")
    elif tp is type(None):
        assert value is None, where
    elif tp is float:  # JSON numbers: an int is a float's value too
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}: {value!r}"
    else:
        assert isinstance(value, tp), f"{where}: {value!r} is not {tp}"


def test_the_summary_is_what_its_types_say() -> None:
    """``summary.Summary`` is what results.json holds: every key the bench writes is declared (with
    its type) and every required one is written, with all figures present and with none."""
    samples = [_sample("full", 16, 0.010), _sample("split", 16, 0.0102), _sample("full", 512, 0.012),
               _sample("split", 512, 0.0125)]
    conc = [ConcurrencySample("split", 1, 1.0, 10, (10.0,)), ConcurrencySample("full", 1, 1.0, 12, (12.0,)),
            ConcurrencySample("split", 8, 1.0, 45, (5.6,) * 8)]
    memory = Memory(full_rss_bytes=1000, client_rss_bytes=550, daemon_rss_bytes=700, baseline_rss_bytes=100)
    chat = ChatFigures(ratio=0.95, source="c.json", app_tokens_per_s_median=19.0,
                       idle_cpu_percent_of_one_core={"chat_screen": 0.7})
    full = report.summarise(samples, conc, hidden=8, itemsize=4, memory=memory, chat=chat)
    _conforms(full, Summary, "summary")
    assert "scaling_vs_one" in full["concurrency"]["1"]["split"] and "ratio_aggregate" in full["concurrency"]["1"]
    _conforms(report.summarise([], [], hidden=8, itemsize=4, memory=Memory(daemon_rss_bytes=None), chat=None),
              Summary, "empty summary")
    with pytest.raises(AssertionError, match="not in ModeSummary"):  # the check itself sees a stray key
        _conforms({**full, "full": {**full["full"], "stray": 1}}, Summary, "summary")
