"""Full vs split, defined once (``shared.comparison``): the agreement measure, pooling, and one
comparison of a tiny model's whole model against its parts in one process."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from splitlm.shared.comparison import Agreement, compare, pooled_agreement
from splitlm.shared.generation import GenerationSettings, LocalPipeline, generate
from splitlm.shared.models import PartSpec, build_parts, family_for, resolve
from tests.shared.test_engine import PROMPT, _InProcessSplit, _NoText


def test_agreement() -> None:
    same = Agreement.of([1, 2, 3], [1, 2, 3])
    assert same.identical and same.first_difference is None and same.percent == 100
    diff = Agreement.of([1, 2, 3, 4], [1, 2, 9, 4])
    assert not diff.identical and diff.first_difference == 2 and diff.matching_prefix == 2 and diff.percent == 50
    shorter = Agreement.of([1, 2, 3], [1, 2])
    assert not shorter.identical and shorter.first_difference == 2 and shorter.compared == 3
    assert Agreement.of([], []).percent == 100


def test_pooling_sums_prefixes_over_positions() -> None:
    p = pooled_agreement([Agreement.of([1, 2, 3], [1, 2, 3]), Agreement.of([1, 2, 3], [1, 9, 3])])
    assert (p.runs, p.identical_runs, p.tokens, p.matching_tokens) == (2, 1, 6, 4)
    assert p.percent == pytest.approx(400 / 6)
    assert math.isnan(pooled_agreement([]).percent)


@pytest.fixture(scope="module")
def llama_parts(tiny_models: dict[str, Path]) -> list:  # type: ignore[type-arg]
    src = resolve(str(tiny_models["llama"]))
    specs = [PartSpec.bottom(2), PartSpec.trunk(2, 4), PartSpec.top(4, 6), PartSpec.full(6)]
    return build_parts(src, family_for(src.config), specs, torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("split_first", [False, True])
def test_compare_runs_both_in_order_and_agrees(llama_parts: list, split_first: bool) -> None:  # type: ignore[type-arg]
    full, split = LocalPipeline(llama_parts[3]), _InProcessSplit(llama_parts[:3])
    settings = GenerationSettings(max_new_tokens=12)
    runs: list[str] = []
    tokens: dict[str, int] = {"full": 0, "split": 0}

    def on_token(mode: str, ev: object) -> None:
        tokens[mode] += 1

    c = compare(full, split, _NoText(), PROMPT, settings, [], warmup=True, split_first=split_first,
                on_run=runs.append, on_token=on_token)
    assert runs == (["split", "full"] if split_first else ["full", "split"])
    assert tokens == {"full": 12, "split": 12}  # the warm-up's tokens are not reported
    assert c.prompt_ids == tuple(PROMPT)
    alone = generate(LocalPipeline(llama_parts[3]), _NoText(), list(PROMPT), settings, []).token_ids
    assert c.full.token_ids == c.split.token_ids == alone  # split is token-exact
    a = c.agreement
    assert a.identical and a.matching_prefix == 12 and a.percent == 100
    assert c.full_stats.tokens == c.split_stats.tokens == 12


def test_a_stop_request_ends_both_runs(llama_parts: list) -> None:  # type: ignore[type-arg]
    c = compare(LocalPipeline(llama_parts[3]), _InProcessSplit(llama_parts[:3]), _NoText(), PROMPT,
                GenerationSettings(max_new_tokens=12), [], should_stop=lambda: True)
    assert c.full.finish_reason == c.split.finish_reason == "cancelled" and not c.full.token_ids
