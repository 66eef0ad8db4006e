"""Speculative decoding is exact across the split on the real model: SmolLM2 through a real
daemon with a prompt-lookup draft gives the tokens, the verification chunks and the logits of
the full model with the same draft, bit for bit, greedy and sampled (issue 12, exactness)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch

from splitlm.shared import prepare
from splitlm.shared.client import TrunkClient
from splitlm.shared.draft.ngram import NgramDrafter
from splitlm.shared.generation import (
    GenerationResult,
    GenerationSettings,
    LocalPipeline,
    generate,
    prompt_ids,
)
from splitlm.shared.sampling import SamplingSettings
from tests.conftest import Daemon, run_cli, start_daemon
from tests.reliability.helpers import Recording

pytestmark = pytest.mark.realmodel

GROUNDED = (
    "Repeat this sentence word for word: the lighthouse keeper climbed the narrow stairs every "
    "evening to light the lamp for the ships."
)
"""Input-grounded: the reply quotes the prompt, so prompt lookup gets drafts accepted."""
OPEN = "Write two sentences about autumn."
TOKENS = 40


@dataclass
class Sides:
    """The daemon's SmolLM2 split and the same weights whole, loaded once for the module."""

    model: prepare.LoadedModel
    parts: prepare.SplitParts
    client: TrunkClient


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, Sides]]:
    tmp = tmp_path_factory.mktemp("smolspec")
    d = start_daemon("smollm2", f"unix:{tmp / 'trunk.sock'}", tmp / "trunkd.log")
    client = TrunkClient(d.address)
    model = prepare.load_model("smollm2")
    parts = prepare.split_parts(model, client.info(), torch.device("cpu"), with_full=True)
    yield d, Sides(model, parts, client)
    client.close()
    assert d.stop() == 0


def _both(sides: Sides, prompt: str, sampling: SamplingSettings) -> tuple[
    tuple[GenerationResult, Recording], tuple[GenerationResult, Recording]
]:
    """The prompt's reply full and split, each with its own ``ngram`` drafter, steps recorded."""
    assert sides.parts.full is not None
    ids = prompt_ids(sides.model.tokenizer, prompt, chat=True)
    settings = GenerationSettings(max_new_tokens=TOKENS, sampling=sampling)
    out = []
    for pipe in (LocalPipeline(sides.parts.full), prepare.split_pipeline(sides.parts, sides.client)):
        rec = Recording(pipe)  # type: ignore[arg-type]  # any pipeline records the same way
        # one link weight for both (as ``compare`` does): the same lengths, so the same chunks
        res = generate(rec, sides.model.tokenizer, ids, settings, sides.model.eos_ids,
                       drafter=NgramDrafter(), draft_max=8, draft_link=0.0)
        rec.close()
        out.append((res, rec))
    return out[0], out[1]


def _assert_same(full: tuple[GenerationResult, Recording], split: tuple[GenerationResult, Recording]) -> None:
    (fr, frec), (sr, srec) = full, split
    assert sr.token_ids == fr.token_ids
    assert (sr.steps, sr.drafted, sr.accepted) == (fr.steps, fr.drafted, fr.accepted)
    assert [x.shape for x in srec.logits] == [x.shape for x in frec.logits]  # the same chunks
    for i, (a, b) in enumerate(zip(srec.logits, frec.logits)):
        assert torch.equal(a, b), f"verification step {i} ({a.shape[0]} positions) differs"


@pytest.mark.parametrize("prompt", [GROUNDED, OPEN], ids=["grounded", "open"])
def test_greedy_split_with_a_draft_equals_full_with_it(smol, prompt: str) -> None:  # type: ignore[no-untyped-def]
    _, sides = smol
    full, split = _both(sides, prompt, SamplingSettings())
    _assert_same(full, split)
    assert len(full[0].token_ids) >= 10
    if prompt is GROUNDED:
        # drafts were verified several positions at a time and kept: the check above compared
        # multi-position steps, not only one-token ones
        assert full[0].accepted > 0 and full[0].steps < len(full[0].token_ids)
        assert any(x.shape[0] > 1 for x in full[1].logits)


def test_sampled_split_with_a_draft_equals_full_with_it(smol) -> None:  # type: ignore[no-untyped-def]
    _, sides = smol
    full, split = _both(sides, GROUNDED, SamplingSettings(temperature=0.8, seed=1234))
    _assert_same(full, split)
    assert full[0].drafted > 0


def test_compare_with_a_draft_reports_identical_agreement_and_draft_figures(smol) -> None:  # type: ignore[no-untyped-def]
    d, _ = smol
    r = run_cli("compare", "--trunk", d.address, "--draft", "ngram", "--max-new-tokens", str(TOKENS),
                "--json", GROUNDED)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["agreement"]["identical"] is True and out["agreement"]["first_divergence"] is None
    full, split = out["draft"]["full"], out["draft"]["split"]
    for key in ("steps", "tokens_per_step", "drafted", "accepted", "acceptance"):
        assert full[key] == split[key], key
    assert full["accepted"] > 0
