"""Full vs split: the same prompt through the whole model here and through the split, one after
the other, with the same settings; and how far their tokens agree.

One definition for every face: ``splitlm compare``, the chat app's compare screen and
``splitlm bench`` all run ``compare`` and read a ``Comparison``; the bench pools many of them
with ``pooled_agreement``. The caller builds and closes the pipelines (a bench run wants fresh
ones per run, the CLI one of each); nothing here loads a model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Literal

from .stats import ReplyStats

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from .draft.base import Drafter
    from .generation import GenerationResult, GenerationSettings, Pipeline, TokenEvent

Mode = Literal["full", "split"]
MODES: tuple[Mode, Mode] = ("full", "split")

WARMUP_TOKENS = 2
"""Tokens of the unmeasured warm-up run: the first calls pay one-off costs (allocator, kernels)."""


@dataclass(frozen=True)
class Agreement:
    """How the split's tokens agree with the full model's.

    Attributes:
        matching_prefix: leading tokens that are equal.
        identical: both sequences are the same.
        first_difference: index of the first differing token (None when identical).
        full_tokens, split_tokens: the two lengths.
    """

    matching_prefix: int
    identical: bool
    first_difference: int | None
    full_tokens: int
    split_tokens: int

    @classmethod
    def of(cls, full: Sequence[int], split: Sequence[int]) -> Agreement:
        n = 0
        for a, b in zip(full, split):
            if a != b:
                break
            n += 1
        same = list(full) == list(split)
        return cls(n, same, None if same else n, len(full), len(split))

    @property
    def compared(self) -> int:
        """The positions the agreement is counted over: the longer sequence's."""
        return max(self.full_tokens, self.split_tokens)

    @property
    def percent(self) -> float:
        """Share of positions where the two agree (the matching prefix) over the longer sequence."""
        return 100.0 if self.compared == 0 else 100.0 * self.matching_prefix / self.compared


@dataclass(frozen=True)
class PooledAgreement:
    """Many comparisons' agreement together (``splitlm bench``'s rounds and prompt lengths).

    Attributes:
        runs: comparisons pooled.
        identical_runs: those whose tokens were identical.
        tokens: positions compared, each comparison's longer sequence.
        matching_tokens: matching prefixes summed.
    """

    runs: int
    identical_runs: int
    tokens: int
    matching_tokens: int

    @property
    def percent(self) -> float:
        """``Agreement.percent`` over the pool; NaN for none."""
        return 100.0 * self.matching_tokens / self.tokens if self.tokens else float("nan")


def pooled_agreement(agreements: Iterable[Agreement]) -> PooledAgreement:
    items = list(agreements)
    return PooledAgreement(
        runs=len(items),
        identical_runs=sum(a.identical for a in items),
        tokens=sum(a.compared for a in items),
        matching_tokens=sum(a.matching_prefix for a in items),
    )


@dataclass(frozen=True)
class Comparison:
    """One prompt generated both ways.

    Attributes:
        prompt_ids: the prompt's token ids (the same for both).
        full, split: the two generations, with their timings and wire bytes.
    """

    prompt_ids: tuple[int, ...]
    full: GenerationResult
    split: GenerationResult

    @property
    def agreement(self) -> Agreement:
        return Agreement.of(self.full.token_ids, self.split.token_ids)

    @property
    def full_stats(self) -> ReplyStats:
        return ReplyStats.of(self.full)

    @property
    def split_stats(self) -> ReplyStats:
        return ReplyStats.of(self.split)

    def result(self, mode: Mode) -> GenerationResult:
        return self.full if mode == "full" else self.split


def compare(
    full: Pipeline,
    split: Pipeline,
    tokenizer: PreTrainedTokenizerBase,
    ids: Sequence[int],
    settings: GenerationSettings,
    eos_ids: Sequence[int],
    *,
    warmup: bool = False,
    split_first: bool = False,
    on_run: Callable[[Mode], None] | None = None,
    on_token: Callable[[Mode, TokenEvent], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    drafters: Mapping[Mode, Drafter | None] | None = None,
    draft_max: int = 8,
    draft_link: float | None = None,
) -> Comparison:
    """Generate ``ids``'s reply through ``full`` and through ``split``, each from position 0.

    Args:
        full, split: the two pipelines; each run starts at position 0 (rolling back what a
            warm-up left). The caller closes them.
        warmup: first run each for ``WARMUP_TOKENS`` tokens, unmeasured.
        split_first: run the split first (the bench alternates, so drift hits both alike).
        on_run: told which mode starts, before each measured run.
        on_token: every measured token, with its mode, on the calling thread.
        should_stop: polled between tokens; ends a run early (``finish_reason="cancelled"``).
        drafters: each mode's own drafter (the same kind on both sides: their drafts, lengths and
            verification chunks are then the same, so greedy tokens compare bit for bit); absent
            or None decodes one token per step.
        draft_max: the longest draft.
        draft_link: the link weight both sides draft with (None: the split's own estimate).

    Returns:
        Both results.
    """
    from .generation import generate

    pipes = {"full": full, "split": split}
    draft = dict(drafters or {})
    order: tuple[Mode, ...] = MODES[::-1] if split_first else MODES
    if warmup:
        warm = replace(settings, max_new_tokens=WARMUP_TOKENS, stop=())
        for mode in order:
            generate(pipes[mode], tokenizer, list(ids), warm, eos_ids, drafter=draft.get(mode),
                     draft_max=draft_max, draft_link=0.0)
    # both sides weigh a round trip as the split's link does, so drafts verify the same chunks
    link = split.link_ratio if draft_link is None else draft_link
    out: dict[str, GenerationResult] = {}
    for mode in order:
        if on_run is not None:
            on_run(mode)
        tell = None if on_token is None else partial(on_token, mode)
        out[mode] = generate(pipes[mode], tokenizer, list(ids), settings, eos_ids, on_token=tell,
                             should_stop=should_stop, drafter=draft.get(mode), draft_max=draft_max,
                             draft_link=link)
    return Comparison(tuple(ids), out["full"], out["split"])
