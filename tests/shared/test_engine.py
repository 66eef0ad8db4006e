"""Parts in one process, no socket: split greedy tokens equal transformers' own ``generate``."""

from __future__ import annotations

import pytest
import torch

from splitlm.shared.generation import GenerationSettings, LocalPipeline, generate
from splitlm.shared.models import PartSpec, build_parts, family_for, resolve
from splitlm.shared.plan import SplitPlan
from tests.conftest import FAMILY_KINDS, reference_generate

PROMPT = [5, 17, 42, 99, 7, 3, 250, 11, 64, 8, 31, 200, 150, 4, 9, 77, 12, 13, 6, 300]  # 20 > window 6


class _InProcessSplit:
    """Bottom, trunk and top parts in one process: the split's arithmetic without the wire."""

    def __init__(self, parts: list) -> None:  # type: ignore[type-arg]
        self.parts = parts
        self.caches = [p.new_cache() for p in parts]
        self.bytes_sent = self.bytes_received = 0
        self.link_ratio = 0.0

    def step(self, ids, position, logits_for=1):  # type: ignore[no-untyped-def]
        from splitlm.shared.generation import StepOutput

        x = torch.tensor([list(ids)])
        for part, cache in zip(self.parts, self.caches):
            x = part.forward(x, position, cache, logits_for=logits_for) if part.spec.head else part.forward(x, position, cache)
        return StepOutput(x[0], 0.0)

    def close(self) -> None:
        pass


def _split_tokens(path, plan: tuple[int, int], n: int, prompt=PROMPT) -> list[int]:  # type: ignore[no-untyped-def]
    src = resolve(str(path))
    fam = family_for(src.config)
    L = src.config.num_hidden_layers
    a, b = plan
    parts = build_parts(src, fam, [PartSpec.bottom(a), PartSpec.trunk(a, b), PartSpec.top(b, L)],
                        torch.float32, torch.device("cpu"))
    res = generate(_InProcessSplit(parts), _NoText(), list(prompt), GenerationSettings(max_new_tokens=n),
                   src.generation_eos())
    return res.token_ids


class _NoText:
    """Tokenizer stand-in for random models (their ids have no text)."""

    def decode(self, ids, skip_special_tokens=True):  # type: ignore[no-untyped-def]
        return " ".join(str(i) for i in ids)


@pytest.mark.parametrize("kind", FAMILY_KINDS)
@pytest.mark.parametrize("plan", [(2, 4), (1, 5), (3, 4), (4, 5)])
def test_split_equals_transformers_generate(tiny_models, kind, plan) -> None:  # type: ignore[no-untyped-def]
    want = reference_generate(tiny_models[kind], PROMPT, 24)
    assert _split_tokens(tiny_models[kind], plan, 24) == want


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_full_part_equals_transformers_generate(tiny_models, kind) -> None:  # type: ignore[no-untyped-def]
    src = resolve(str(tiny_models[kind]))
    fam = family_for(src.config)
    (full,) = build_parts(src, fam, [PartSpec.full(6)], torch.float32, torch.device("cpu"))
    res = generate(LocalPipeline(full), _NoText(), PROMPT, GenerationSettings(max_new_tokens=24), src.generation_eos())
    assert res.token_ids == reference_generate(tiny_models[kind], PROMPT, 24)


@pytest.mark.parametrize("kind", ["llama", "gemma3", "mistral"])
def test_rollback_regenerates_the_same_tokens(tiny_models, kind) -> None:  # type: ignore[no-untyped-def]
    """Going back to an earlier position (past the sliding window) gives the same continuation."""
    src = resolve(str(tiny_models[kind]))
    fam = family_for(src.config)
    parts = build_parts(src, fam, [PartSpec.bottom(2), PartSpec.trunk(2, 4), PartSpec.top(4, 6)],
                        torch.float32, torch.device("cpu"))
    pipe = _InProcessSplit(parts)
    first = generate(pipe, _NoText(), PROMPT, GenerationSettings(max_new_tokens=16), []).token_ids
    # the same prompt again from position 0 reuses nothing and must agree
    again = generate(pipe, _NoText(), PROMPT, GenerationSettings(max_new_tokens=16), []).token_ids
    assert again == first
    # regenerate from the middle of the reply: positions [len(PROMPT) + 8, ...) are recomputed
    keep = len(PROMPT) + 8
    tail = generate(pipe, _NoText(), [first[8]], GenerationSettings(max_new_tokens=7), [],
                    start_position=keep).token_ids
    assert tail == first[9:16]
    assert all(c.length == keep + 7 for c in pipe.caches)


def test_parts_hold_only_their_own_weights(tiny_models) -> None:  # type: ignore[no-untyped-def]
    src = resolve(str(tiny_models["llama"]))
    fam = family_for(src.config)
    (trunk,) = build_parts(src, fam, [PartSpec.trunk(2, 4)], torch.float32, torch.device("cpu"))
    real = {n for n, p in trunk.model.named_parameters() if p.device.type != "meta"}
    assert real and all(n.startswith(("model.layers.2.", "model.layers.3.")) for n in real)


def test_plan_validation_gives_the_range() -> None:
    from splitlm.shared.errors import PlanError

    for a, b in [(0, 5), (20, 10), (5, 5), (3, 99)]:
        with pytest.raises(PlanError, match="0 < A < B < 30"):
            SplitPlan(30, a, b)
    with pytest.raises(PlanError, match="A:B"):
        SplitPlan.parse("7", 30, (2, 28))
    assert SplitPlan.parse(None, 30, (2, 28)).split == (2, 28)
