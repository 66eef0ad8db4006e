"""Speculative decoding through a real daemon: on every family, split + draft gives the same
tokens as the full model + the same draft (same chunks, so bit for bit), greedy and sampled,
with prompt lookup and with a small draft model; and the CLI reports the draft's figures."""

from __future__ import annotations

import json

import pytest
import torch

from splitlm.shared import prepare
from splitlm.shared.client import TrunkClient
from splitlm.shared.draft.build import build_drafter
from splitlm.shared.generation import GenerationSettings, LocalPipeline, generate
from splitlm.shared.sampling import SamplingSettings
from tests.conftest import FAMILY_KINDS, run_cli
from tests.shared.test_engine import PROMPT, _NoText

CPU = torch.device("cpu")


def _model(path) -> prepare.LoadedModel:  # type: ignore[no-untyped-def]
    from splitlm.shared.models import family_for, resolve

    src = resolve(str(path))
    return prepare.LoadedModel(src, family_for(src.config), _NoText(), src.generation_eos())  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_split_with_drafts_equals_full_with_drafts(tiny_models, daemon_factory, kind) -> None:  # type: ignore[no-untyped-def]
    d = daemon_factory(tiny_models[kind], "--split", "2:4")
    model = _model(tiny_models[kind])
    client = TrunkClient(d.address)
    try:
        parts = prepare.split_parts(model, client.info(), CPU, with_full=True)
        assert parts.full is not None
        # the draft model: another family member of the same vocabulary (its drafts are poor,
        # so rejections and rollbacks happen); prompt lookup on a repeating prompt accepts often
        other = tiny_models["llama" if kind != "llama" else "qwen2"]
        cases = [
            ("ngram", SamplingSettings(), PROMPT * 2),
            (f"model:{other}", SamplingSettings(), PROMPT),
            ("ngram", SamplingSettings(temperature=0.9, top_p=0.9, seed=7), PROMPT * 2),
            (f"model:{other}", SamplingSettings(temperature=1.2, seed=3), PROMPT),
        ]
        for spec, sampling, prompt in cases:
            settings = GenerationSettings(max_new_tokens=24, sampling=sampling)
            runs = []
            for pipe in (LocalPipeline(parts.full), prepare.split_pipeline(parts, client)):
                drafter = build_drafter(spec, model, CPU, parts.bottom, parts.top)
                assert drafter is not None
                try:
                    # one link weight for both (as compare does): the same chunks on both sides; a
                    # slow one, so that a draft model as large as the model still drafts
                    runs.append(generate(pipe, _NoText(), list(prompt), settings, [], drafter=drafter,
                                         draft_max=6, draft_link=3.0))
                finally:
                    pipe.close()
            full, split = runs
            assert split.token_ids == full.token_ids, (spec, sampling)
            assert (split.steps, split.drafted, split.accepted) == (full.steps, full.drafted, full.accepted)
            assert split.drafted > 0, spec
        plain = generate(LocalPipeline(parts.full), _NoText(), PROMPT * 2, GenerationSettings(max_new_tokens=24), [])
        with_lookup = generate(prepare.split_pipeline(parts, client), _NoText(), PROMPT * 2,
                               GenerationSettings(max_new_tokens=24), [],
                               drafter=build_drafter("ngram", model, CPU), draft_max=6)
        # chunked verification may differ from one-position steps only at float near-ties;
        # these random models' logits are decisive
        assert with_lookup.token_ids == plain.token_ids
    finally:
        client.close()


def test_cli_generate_and_compare_with_a_draft(tiny_text_models, daemon_factory) -> None:  # type: ignore[no-untyped-def]
    path = tiny_text_models["llama"]
    d = daemon_factory(path, "--split", "2:4")
    common = ("--trunk", d.address, "--model", str(path), "--no-chat", "--max-new-tokens", "24")
    prompt = "abc abc abc abc abc abc"
    plain = json.loads(run_cli("generate", *common, "--json", prompt).stdout)
    r = run_cli("generate", *common, "--json", "--draft", "ngram", "--draft-max", "4", prompt)
    assert r.returncode == 0, r.stderr
    drafted = json.loads(r.stdout)
    assert drafted["token_ids"] == plain["token_ids"]
    assert drafted["draft"]["drafted"] > 0 and drafted["draft"]["steps"] <= plain["draft"]["steps"]
    assert plain["draft"] == {"steps": 24, "tokens_per_step": 1.0, "drafted": 0, "accepted": 0,
                              "acceptance": None, "draft_s": 0.0} or plain["finish_reason"] == "eos"
    r = run_cli("generate", *common, prompt, env={"SPLITLM_DRAFT": "ngram:2"})  # the environment's draft
    assert r.returncode == 0 and "splitlm: draft ngram:2:" in r.stderr and "per round trip" in r.stderr
    r = run_cli("compare", *common, "--json", "--draft", "ngram", prompt)
    out = json.loads(r.stdout)
    assert out["agreement"]["identical"] and out["draft"]["split"]["drafted"] == out["draft"]["full"]["drafted"] > 0


@pytest.mark.parametrize(("value", "message"), [
    ("ngram:12", "allowed: off, ngram, ngram:N (N = 1..8"),
    ("bogus", "allowed: off, ngram"),
    ("model:/nonexistent/draft", "--draft model:/nonexistent/draft"),
])
def test_cli_refuses_a_draft_that_names_nothing(tiny_text_models, daemon_factory, value, message) -> None:  # type: ignore[no-untyped-def]
    path = tiny_text_models["llama"]
    # a value that does not parse is refused before any connection; a draft that does not load,
    # once the daemon's plan is known
    trunk = daemon_factory(path, "--split", "2:4").address if value.startswith("model:") else "unix:/nonexistent.sock"
    r = run_cli("generate", "--trunk", trunk, "--model", str(path), "--no-chat", "--draft", value, "hi")
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
