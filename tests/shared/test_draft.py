"""Drafts without a socket: parsing ``--draft``, prompt lookup, the length control, the
verification rules, and speculative sampling's distribution (a goodness-of-fit test)."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Sequence

import pytest
import torch

from splitlm.shared.draft.base import Draft, Drafter
from splitlm.shared.draft.control import DraftControl, expected_tokens
from splitlm.shared.draft.ngram import NgramDrafter, lookup
from splitlm.shared.draft.spec import DraftSpec
from splitlm.shared.draft.verify import verify
from splitlm.shared.errors import UsageError
from splitlm.shared.generation import GenerationSettings, LocalPipeline, generate
from splitlm.shared.models import PartSpec, build_part, family_for, resolve
from splitlm.shared.sampling import Sampler, SamplingSettings
from tests.shared.test_engine import PROMPT, _NoText

# ---- --draft


@pytest.mark.parametrize(("raw", "kind", "target", "shown"), [
    ("off", "off", "", "off"), ("", "off", "", "off"), ("ngram", "ngram", "3", "ngram"),
    ("ngram:2", "ngram", "2", "ngram:2"), (" NGRAM:3 ", "ngram", "3", "ngram"),
    ("model:/m/x", "model", "/m/x", "model:/m/x"), ("student:s", "student", "s", "student:s"),
])
def test_draft_values_parse(raw: str, kind: str, target: str, shown: str) -> None:
    spec = DraftSpec.parse(raw)
    assert (spec.kind, spec.target, str(spec)) == (kind, target, shown)
    assert DraftSpec.parse(str(spec)) == spec


@pytest.mark.parametrize("raw", ["ngrams", "ngram:0", "ngram:9", "ngram:x", "model:", "student: ", "gpt2", "off:1"])
def test_draft_values_that_name_nothing_are_refused(raw: str) -> None:
    with pytest.raises(UsageError, match="--draft"):
        DraftSpec.parse(raw)


# ---- prompt lookup


def test_lookup_takes_the_latest_longest_match() -> None:
    ctx = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    assert lookup(ctx, 2, 3) == [7, 8]  # "2 3" last occurred before "7 8" (not the earlier "9 9")
    assert lookup(ctx, 5, 3) == [7, 8, 5, 2, 3]
    assert lookup([4, 5, 6], 3, 3) == []
    assert lookup([1, 2, 1], 4, 3) == [2, 1]  # n = 1: after the earlier "1"
    assert lookup(ctx, 0, 3) == []


# ---- the length control


def test_control_grows_after_full_accepts_and_shrinks_after_rejections() -> None:
    c = DraftControl(draft_max=8, link=0.8)
    assert c.length == 4 and 1 <= c.next_length(100) <= 4  # the cost model may cut it shorter
    c.verified(4, 4)
    assert c.length == 6
    c.verified(6, 2)
    assert c.length == 5
    assert c.next_length(2) <= 2  # never past the reply's room
    assert c.next_length(0) == 0


def test_control_pauses_when_drafts_do_not_pay_then_probes() -> None:
    c = DraftControl(draft_max=8, draft_cost=0.3, link=0.8)
    lengths = []
    for _ in range(80):  # every draft rejected
        k = c.next_length(100)
        lengths.append(k)
        if k:
            c.verified(k, 0)
    assert lengths[0] > 0  # the prior pays across a link
    probes = [i for i, k in enumerate(lengths) if k > 0][1:]
    assert probes and all(lengths[i] == 1 for i in probes)  # after the pause: one-token probes
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert gaps == sorted(gaps) and gaps[-1] >= 16  # the pause doubles while probes fail
    assert expected_tokens(0.0, 4) == pytest.approx(1.0) and expected_tokens(0.5, 1) == pytest.approx(1.5)


def test_a_slow_link_makes_costly_drafts_pay() -> None:
    """At 0.6 acceptance a draft costing 0.37 of a step does not pay next to the model, but
    does when a round trip takes 0.8 of a step's compute (SmolLM2 across a 50 ms link)."""
    here = DraftControl(draft_max=8, draft_cost=0.37, accepted_w=1.2, tried_w=2.0)
    remote = DraftControl(draft_max=8, draft_cost=0.37, link=0.8, accepted_w=1.2, tried_w=2.0)
    assert here.best_length() == 0 and remote.best_length() >= 1


def test_cheap_drafts_keep_going_at_moderate_acceptance() -> None:
    c = DraftControl(draft_max=8, draft_cost=0.0)
    lengths = []
    for i in range(30):
        k = c.next_length(100)
        lengths.append(k)
        c.verified(k, k if i % 3 else k // 2)  # every third draft half kept: ~0.8 per token
    assert min(lengths) > 0 and max(lengths) >= 6


# ---- the rules


def test_greedy_verification_keeps_the_agreeing_prefix_then_the_models_token() -> None:
    logits = torch.full((4, 10), -5.0)
    for i, t in enumerate([3, 4, 8, 1]):
        logits[i, t] = 5.0
    s = Sampler(SamplingSettings())
    assert verify(logits, Draft([3, 4, 5]), s) == ([3, 4, 8], 2)
    assert verify(logits, Draft([3, 4, 8]), s) == ([3, 4, 8, 1], 3)
    assert verify(logits, Draft([0, 4, 8]), s) == ([3], 0)


class _FixedDrafter:
    """Proposes from a fixed distribution over a few tokens, with its probabilities (sampled) or
    a fixed token sequence (point masses)."""

    name = "fixed"
    cost = 0.0

    def __init__(self, support: Sequence[int], vocab: int, sampled: bool) -> None:
        self.q = torch.zeros(vocab)
        # far from the model's p (most mass on its second choice): many rejections, so a wrong
        # residual distribution shows
        self.q[list(support)] = torch.tensor([0.1, 0.7, 0.2])[: len(support)]
        self.support = list(support)
        self.sampled = sampled

    def propose(self, context: Sequence[int], k: int, sampling: SamplingSettings, generator: torch.Generator) -> Draft:
        if not self.sampled:
            return Draft([self.support[(len(context) + i) % len(self.support)] for i in range(k)])
        toks = [int(torch.multinomial(self.q, 1, generator=generator)) for _ in range(k)]
        return Draft(toks, self.q.expand(k, -1).clone())

    def close(self) -> None:
        pass


def _tiny_full(tiny_models, kind: str = "llama"):  # type: ignore[no-untyped-def]
    src = resolve(str(tiny_models[kind]))
    return build_part(src, family_for(src.config), PartSpec.full(6), torch.float32, torch.device("cpu"))


def _exact_distribution(part, prompt: list[int], sampling: SamplingSettings, n: int) -> dict[tuple[int, ...], float]:  # type: ignore[no-untyped-def]
    """P(continuation) of every n-token continuation under plain sampling, from the model."""
    s = Sampler(sampling)
    out: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(n):
        nxt: dict[tuple[int, ...], float] = {}
        for seq, p in out.items():
            logits = part.forward(torch.tensor([prompt + list(seq)]), 0, part.new_cache())[0, -1]
            probs = s.distribution(logits)
            for t in torch.nonzero(probs).flatten().tolist():
                nxt[(*seq, t)] = p * float(probs[t])
        out = nxt
    return out


def _chi2_pvalue(counts: Counter[tuple[int, ...]], expected: dict[tuple[int, ...], float], n: int) -> float:
    stat = sum((counts.get(k, 0) - n * p) ** 2 / (n * p) for k, p in expected.items())
    stat += sum(c for k, c in counts.items() if k not in expected) * 1e9  # impossible outcomes
    dof = len(expected) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))


@pytest.mark.parametrize("sampled", [False, True], ids=["point-mass-draft", "sampled-draft"])
def test_speculative_sampling_keeps_the_distribution(tiny_models, monkeypatch, sampled: bool) -> None:
    """Continuations of 4 tokens sampled with drafts (2 drafted, 1 bonus per verification) follow
    the model's own distribution (chi-square over all 16 outcomes of top-2 sampling); the same
    test rejects two broken rules: keeping every drafted token, and drawing a rejected token's
    replacement from p instead of ``max(0, p - q)``."""
    part = _tiny_full(tiny_models)
    prompt = PROMPT[:6]
    sampling = SamplingSettings(temperature=1.0, top_k=2)
    expected = _exact_distribution(part, prompt, sampling, 4)
    # the draft proposes likely and unlikely tokens both: rejections and the residual are used
    top = torch.topk(part.forward(torch.tensor([prompt]), 0, part.new_cache())[0, -1], 3).indices.tolist()
    drafter: Drafter = _FixedDrafter(top, int(part.config.vocab_size), sampled)
    pipe = LocalPipeline(part)
    n = 600  # the smallest outcome's expected count is still > 5

    def run(n: int) -> tuple[Counter[tuple[int, ...]], int, int]:
        counts: Counter[tuple[int, ...]] = Counter()
        drafted = accepted = 0
        for seed in range(n):
            st = GenerationSettings(max_new_tokens=4, sampling=SamplingSettings(temperature=1.0, top_k=2, seed=seed))
            res = generate(pipe, _NoText(), prompt, st, [], drafter=drafter, draft_max=2)
            counts[tuple(res.token_ids)] += 1
            drafted, accepted = drafted + res.drafted, accepted + res.accepted
        return counts, drafted, accepted

    assert min(expected.values()) * n > 5
    counts, drafted, accepted = run(n)
    assert drafted >= n and 0 < accepted < drafted  # the rule was exercised both ways
    assert _chi2_pvalue(counts, expected, n) > 1e-3

    import splitlm.shared.generation as g

    def keep_all(logits, draft, sampler):  # type: ignore[no-untyped-def]
        return [*draft.tokens, sampler.draw(sampler.distribution(logits[len(draft.tokens)]))], len(draft.tokens)

    def residual_is_p(logits, draft, sampler):  # type: ignore[no-untyped-def]
        """The right coin, but a rejected token may be drawn again (no ``max(0, p - q)``)."""
        for i, x in enumerate(draft.tokens):
            p = sampler.distribution(logits[i])
            q_x = 1.0 if draft.probs is None else float(draft.probs[i, x])
            if sampler.uniform() >= min(1.0, float(p[x]) / q_x):
                return [*draft.tokens[:i], sampler.draw(p)], i
        return keep_all(logits, draft, sampler)

    for broken_rule in (keep_all, residual_is_p):
        monkeypatch.setattr(g, "verify", broken_rule)
        broken, _, _ = run(200)
        assert _chi2_pvalue(broken, expected, 200) < 1e-6, broken_rule.__name__


def test_ngram_drafts_give_plain_greedy_tokens_in_fewer_steps(tiny_models) -> None:
    part = _tiny_full(tiny_models)
    pipe = LocalPipeline(part)
    prompt = PROMPT * 3  # repeats: prompt lookup finds what follows
    plain = generate(pipe, _NoText(), prompt, GenerationSettings(max_new_tokens=30), [])
    drafted = generate(pipe, _NoText(), prompt, GenerationSettings(max_new_tokens=30), [],
                       drafter=NgramDrafter(), draft_max=8)
    assert drafted.token_ids == plain.token_ids
    assert drafted.accepted > 0 and drafted.steps < plain.steps == 30
    assert drafted.tokens_per_step > 1.0


def test_draft_model_with_another_vocabulary_is_refused(tiny_models, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig, LlamaForCausalLM

    from splitlm.shared.draft.build import build_drafter
    from splitlm.shared.prepare import LoadedModel

    cfg = LlamaConfig(vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "other")
    src = resolve(str(tiny_models["llama"]))
    model = LoadedModel(src, family_for(src.config), _NoText(), [2])  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="500 tokens.*320|vocabulary of 500"):
        build_drafter(f"model:{tmp_path / 'other'}", model, torch.device("cpu"))
    with pytest.raises(UsageError, match="--draft model:"):
        build_drafter(f"model:{tmp_path / 'missing'}", model, torch.device("cpu"))


def test_draft_model_rolls_back_with_the_context(tiny_models) -> None:
    """A small model's draft after a rejection equals the draft of a fresh drafter given the
    same context: the rolled-back cache holds nothing of the rejected tokens."""
    from splitlm.shared.draft.model import load_model_drafter
    from splitlm.shared.prepare import LoadedModel

    src = resolve(str(tiny_models["llama"]))
    model = LoadedModel(src, family_for(src.config), _NoText(), [2])  # type: ignore[arg-type]
    cpu = torch.device("cpu")
    d = load_model_drafter(str(tiny_models["qwen2"]), model, cpu)  # same vocabulary size, other weights
    greedy, gen = SamplingSettings(), torch.Generator()
    first = d.propose(PROMPT, 4, greedy, gen)
    ctx = [*PROMPT, first.tokens[0], (first.tokens[1] + 1) % 320]  # the second token rejected
    again = d.propose(ctx, 4, greedy, gen)
    fresh = load_model_drafter(str(tiny_models["qwen2"]), model, cpu).propose(ctx, 4, greedy, gen)
    assert again.tokens == fresh.tokens and len(again.tokens) == 4
    assert 0 < d.cost < 2


def test_all_outcomes_enumerated_sum_to_one(tiny_models) -> None:
    part = _tiny_full(tiny_models)
    dist = _exact_distribution(part, PROMPT[:6], SamplingSettings(temperature=1.0, top_k=2), 2)
    assert len(dist) == 4 and math.isclose(sum(dist.values()), 1.0, rel_tol=1e-5)
    assert all(len(k) == 2 for k in itertools.islice(dist, 4))
