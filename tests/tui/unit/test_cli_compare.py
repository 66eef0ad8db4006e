"""``splitlm compare``'s output from a ``shared.comparison.Comparison``: the JSON keys and the
text table users read, unchanged by moving the comparison to ``shared``."""

from __future__ import annotations

import json

import pytest

from splitlm.shared.comparison import Comparison
from splitlm.shared.generation import GenerationResult
from splitlm.tui.cli import _comparison_json, _print_comparison


def _result(tokens: list[int], lat: float, trunk: float, wire_bytes: int) -> GenerationResult:
    n = len(tokens)
    return GenerationResult(
        prompt_ids=[1, 2, 3], token_ids=tokens, text=" ".join(map(str, tokens)), ttft_s=0.1,
        per_token_s=[lat] * (n - 1), client_compute_s=[0.002] * n, trunk_compute_s=[trunk] * n,
        bytes_sent=wire_bytes, bytes_received=wire_bytes, steps=len(tokens),
    )


def test_json_and_text(capsys: pytest.CaptureFixture[str]) -> None:
    c = Comparison((1, 2, 3), _result([5, 6, 7, 8], 0.010, 0.0, 0), _result([5, 6, 9, 8], 0.012, 0.007, 4000))
    out = _comparison_json(c, {"model": "m", "layers": 6, "split": [2, 4], "fingerprint": "f"})
    assert set(out) == {"plan", "prompt_tokens", "agreement", "full", "split", "ratios_split_over_full",
                        "draft", "full_text", "split_text"}
    assert out["draft"]["split"] == {"steps": 4, "tokens_per_step": 1.0, "drafted": 0, "accepted": 0,
                                     "acceptance": None, "draft_s": 0.0}
    assert out["agreement"] == {"identical": False, "matching_prefix": 2, "first_divergence": 2,
                                "full_tokens": 4, "split_tokens": 4}
    assert set(out["split"]) == {"tokens", "ttft_s", "per_token_p50_s", "per_token_p95_s", "tokens_per_s",
                                 "total_s", "bytes_per_token", "overhead_p50_s"}
    assert out["split"]["bytes_per_token"] == 2000 and out["split"]["overhead_p50_s"] == pytest.approx(0.003)
    assert out["ratios_split_over_full"]["per_token_p50_s"] == pytest.approx(1.2)
    json.dumps(out)
    _print_comparison(out, "plan: m")
    assert capsys.readouterr().out.splitlines() == [
        "plan: m",
        "tokens: full 4, split 4, 2 agree, first divergence at token 2",
        "                            full     split  split/full",
        "TTFT (ms)                 100.00    100.00       1.000",
        "per-token p50 (ms)         10.00     12.00       1.200",
        "per-token p95 (ms)         10.00     12.00       1.200",
        "tokens/s                  100.00     83.33       0.833",
        f"{'wire bytes/token':22}{'':10}{'2000':>10}",
        f"{'split overhead p50 (ms)':22}{'':10}{'3.000':>10}",
        f"{'tokens per step':22}{'1.00':>10}{'1.00':>10}",
    ]
