"""``generate(..., logprobs=N)`` (what ``splitlm serve`` reports): each token's log-probability is
its position's log-softmax, whether the token came from a plain step or from a verified draft
chunk; without it the loop reports none and its tokens do not change."""

from __future__ import annotations

import torch

from splitlm.shared.draft.ngram import NgramDrafter
from splitlm.shared.generation import GenerationSettings, LocalPipeline, TokenEvent, generate
from splitlm.shared.models import PartSpec, build_parts, family_for, resolve

PROMPT = [1, 5, 9, 14, 5, 9, 14, 5, 9, 14, 5, 9, 22, 7, 5, 9, 14, 5, 9]  # repeats: the n-gram draft proposes


class _NoText:
    def decode(self, ids, skip_special_tokens=True):  # type: ignore[no-untyped-def]
        return " ".join(str(i) for i in ids)


def test_logprobs_are_each_positions_log_softmax(tiny_models) -> None:  # type: ignore[no-untyped-def]
    src = resolve(str(tiny_models["llama"]))
    (full,) = build_parts(src, family_for(src.config), [PartSpec.full(6)], torch.float32, torch.device("cpu"))
    settings = GenerationSettings(max_new_tokens=12)
    plain = generate(LocalPipeline(full), _NoText(), PROMPT, settings, [])
    seen: list[TokenEvent] = []
    with_lp = generate(LocalPipeline(full), _NoText(), PROMPT, settings, [], on_token=seen.append, logprobs=3)
    drafted: list[TokenEvent] = []
    generate(LocalPipeline(full), _NoText(), PROMPT, settings, [], on_token=drafted.append, logprobs=3,
             drafter=NgramDrafter(), draft_max=4, draft_link=10.0)
    assert with_lp.token_ids == plain.token_ids
    assert [e.token_id for e in drafted] == plain.token_ids
    assert any(e.accepted for e in drafted), "the draft never proposed: the chunk rows go untested"
    with torch.no_grad():
        logits = full.forward(torch.tensor([PROMPT + plain.token_ids]), 0, full.new_cache(), logits_for=12 + 1)[0]
    want = torch.log_softmax(logits[:12].float(), dim=-1)
    for events in (seen, drafted):
        for i, e in enumerate(events):
            assert e.logprobs is not None and len(e.logprobs.top) == 3
            assert abs(e.logprobs.logprob - float(want[i, e.token_id])) < 1e-3
            assert e.logprobs.top[0][0] == e.token_id  # greedy: the most likely token
