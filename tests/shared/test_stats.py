"""One percentile for every face: its definition, and that the monitor, ``splitlm compare``, the
chat app and ``splitlm bench`` all compute their p50/p95 with it (they used to disagree: the
monitor interpolated, the others took a nearest rank)."""

from __future__ import annotations

import math
import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from splitlm.shared.generation import GenerationResult
from splitlm.shared.stats import ReplyStats, TokenTiming, percentile, ratio

FINITE = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)


@given(st.lists(FINITE, min_size=2, max_size=40))
def test_percentile_is_statistics_inclusive_quantiles(values: list[float]) -> None:
    cuts = statistics.quantiles(values, n=100, method="inclusive")  # the 1st..99th percentiles
    for k in (1, 5, 25, 50, 75, 95, 99):
        assert percentile(values, k / 100) == pytest.approx(cuts[k - 1], rel=1e-9, abs=1e-6)


def test_percentile_edges() -> None:
    assert math.isnan(percentile([], 0.5))
    assert percentile([7.0], 0.95) == 7.0
    values = [float(v) for v in range(100, 0, -1)]  # 1..100, unsorted
    assert percentile(values, 0.5) == pytest.approx(50.5)  # an even count: the middle two's mean
    assert percentile(values, 0.95) == pytest.approx(95.05)
    assert percentile(values, 0.0) == 1.0 and percentile(values, 1.0) == 100.0
    with pytest.raises(ValueError, match="between 0 and 1"):
        percentile(values, 50)
    assert math.isnan(ratio(1.0, 0.0)) and math.isnan(ratio(math.nan, 1.0)) and ratio(1.0, 4.0) == 0.25


DECODE_S = [0.010, 0.040, 0.020, 0.030]
"""Four decode latencies: nearest rank and interpolation give different p50s (0.030 vs 0.025)."""


def _result() -> GenerationResult:
    n = len(DECODE_S) + 1
    return GenerationResult(
        prompt_ids=[1, 2], token_ids=list(range(10, 10 + n)), ttft_s=0.1, per_token_s=list(DECODE_S),
        client_compute_s=[0.001] * n, trunk_compute_s=[0.0] * n,
    )


def test_every_face_means_the_same_p50_and_p95() -> None:
    from splitlm.daemon.metrics import StepRecorder
    from splitlm.tui.app.stats import ReplyStats as AppReplyStats
    from splitlm.tui.bench import report
    from splitlm.tui.bench.measure import RunSample
    from splitlm.tui.cli import _summary

    want = {q: percentile(DECODE_S, q) for q in (0.5, 0.95)}
    assert want[0.5] == pytest.approx(0.025)

    clock = [0.0]
    rec = StepRecorder(horizon_s=30, clock=lambda: clock[0])
    for i, s in enumerate(DECODE_S):  # the daemon times steps, the monitor reports them in ms
        clock[0] = float(i)
        rec.record(1, s)
    w = rec.window(0.0, 10.0)
    monitor = {0.5: w.p50_ms / 1e3, 0.95: w.p95_ms / 1e3}

    cli = _summary(_result())
    compare_cli = {0.5: cli["per_token_p50_s"], 0.95: cli["per_token_p95_s"]}

    app = AppReplyStats.of(_result())
    chat_app = {0.5: app.p50_s, 0.95: app.p95_s}

    r = _result()
    sample = RunSample("split", 0, 2, r.ttft_s, tuple(r.per_token_s), tuple(r.client_compute_s),
                       tuple(r.trunk_compute_s), (0,) * 5, tuple(r.token_ids))
    m = report.mode_summary([sample])
    bench = {0.5: m["per_token_p50_s"], 0.95: m["per_token_p95_s"]}

    for face in (monitor, compare_cli, chat_app, bench):
        assert face == pytest.approx(want)


def test_reply_stats_overhead_is_latency_minus_both_computes() -> None:
    r = GenerationResult(prompt_ids=[1], token_ids=[5, 6, 7], ttft_s=0.2, per_token_s=[0.05, 0.03],
                         client_compute_s=[0.1, 0.02, 0.02], trunk_compute_s=[0.05, 0.02, 0.02])
    s = ReplyStats.of(r)
    assert s.overhead_p50_s == pytest.approx((0.01 + -0.01) / 2)  # unclamped: clock noise averages out
    assert TokenTiming(0.03, 0.02, 0.02).wire_s == 0.0  # drawn: never negative
