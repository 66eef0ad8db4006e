"""The app's latency figures (``shared.stats`` re-exported) and how it writes them: pure helpers
(agreement is ``tests/shared/test_comparison.py``'s)."""

from __future__ import annotations

import math

from splitlm.shared.generation import GenerationResult
from splitlm.tui.app.stats import (
    ReplyStats,
    TokenTiming,
    fmt_bytes,
    fmt_ms,
    percentile,
    ratio,
)


def result() -> GenerationResult:
    return GenerationResult(
        prompt_ids=[1, 2], token_ids=[5, 6, 7, 8], ttft_s=0.2, per_token_s=[0.05, 0.1, 0.05],
        client_compute_s=[0.1, 0.01, 0.02, 0.01], trunk_compute_s=[0.05, 0.02, 0.03, 0.02],
        bytes_sent=400, bytes_received=400,
    )


def test_percentile_interpolates_between_ranks() -> None:
    # was nearest rank (0.95 of 1..4 gave 4); now the one definition every face shares
    assert percentile([3, 1, 2], 0.5) == 2
    assert math.isclose(percentile([1, 2, 3, 4], 0.95), 3.85)
    assert math.isnan(percentile([], 0.5))


def test_reply_stats_split_each_token_three_ways() -> None:
    s = ReplyStats.of(result())
    assert s.tokens == 4 and s.ttft_s == 0.2
    assert s.per_token_s == [0.05, 0.1, 0.05]
    assert s.p50_s == 0.05 and math.isclose(s.p95_s, 0.095)
    assert math.isclose(s.tokens_per_s, 3 / 0.2)
    assert s.bytes_per_token == 200
    own, trunk, wire = s.mean_split_s()
    assert math.isclose(own, (0.01 + 0.02 + 0.01) / 3)
    assert math.isclose(trunk, (0.02 + 0.03 + 0.02) / 3)
    assert math.isclose(own + trunk + wire, sum(s.per_token_s) / 3)
    assert TokenTiming(0.01, 0.02, 0.0).wire_s == 0.0  # clocks disagree by a hair: never negative


def test_one_token_has_no_decode_speed() -> None:
    r = GenerationResult(prompt_ids=[1], token_ids=[2], ttft_s=0.1, client_compute_s=[0.05], trunk_compute_s=[0.02])
    s = ReplyStats.of(r)
    assert s.tokens == 1 and math.isnan(s.tokens_per_s) and math.isnan(s.p50_s)
    assert all(math.isnan(x) for x in s.mean_split_s())


def test_formatting() -> None:
    assert fmt_ms(0.0123) == "12.3 ms" and fmt_ms(math.nan) == "—"
    assert fmt_bytes(512) == "512 B" and fmt_bytes(2048) == "2.0 KiB"
    assert math.isnan(ratio(1.0, 0.0)) and ratio(1.0, 2.0) == 0.5


def test_draft_figures_live_and_final_are_the_same_numbers() -> None:
    from splitlm.shared.generation import TokenEvent
    from splitlm.tui.app.stats import DraftFigures

    r = GenerationResult(prompt_ids=[1], token_ids=[5, 6, 7, 8, 9], steps=2, drafted=5, accepted=3)
    last = TokenEvent(4, 9, "", 0.0, 0.0, 0.0, steps=2, drafted=5, accepted=3)
    f = DraftFigures.of_result("ngram", r)
    assert DraftFigures.of_event("ngram", last) == f
    assert f.tokens_per_step == 2.5 and f.acceptance == 0.6
    assert f.status() == "draft ngram 2.50 tok/trip 60% acc"
    assert f.rows() == [("round trips", "2 (2.50 tok/trip)"), ("draft", "ngram: 60%, 3 of 5 kept")]


def test_draft_status_names_the_draft_and_its_figures_only_when_there_is_one() -> None:
    from splitlm.tui.app.stats import DraftFigures, draft_status

    plain = DraftFigures("off", 4, 4, 0, 0)
    assert draft_status("off", plain) == "" and draft_status("off", None) == ""
    assert plain.rows() == [("round trips", "4 (1.00 tok/trip)"), ("draft", "off")]
    model = DraftFigures("model:/some/long/path/to/a/draft", 9, 3, 8, 6)
    assert draft_status("model:/some/long/path/to/a/draft", model) == "draft model 3.00 tok/trip 75% acc"
    # a draft chosen but not used yet: named, no figures (the last ones were another draft's)
    assert draft_status("ngram", model) == "draft ngram"
    paused = DraftFigures("ngram", 3, 3, 0, 0)  # drafting paused itself: nothing drafted yet
    assert paused.status() == "draft ngram 1.00 tok/trip" and "nothing drafted" in paused.rows()[1][1]
    assert math.isnan(DraftFigures("ngram", 0, 0, 0, 0).tokens_per_step)
