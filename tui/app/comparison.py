"""Full vs split in the chat app: the chat's model and daemon, ``shared.comparison`` doing the
runs (the same as ``splitlm compare`` and ``splitlm bench``). No UI here; the compare screen's
worker calls it.

The full model is built once, together with its own bottom and top (the three share tensors, as
``splitlm compare`` builds them); each run opens a fresh trunk session and closes it after. With a
draft set, each side gets its own drafter of that draft (the same drafts, lengths and verification
chunks on both sides, so greedy tokens still compare exactly), kept until the draft changes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...shared.comparison import MODES, Comparison
from ...shared.errors import SplitlmError
from ...shared.stats import ReplyStats

if TYPE_CHECKING:
    from ...shared.comparison import Mode
    from ...shared.draft.base import Drafter
    from ...shared.draft.spec import DraftSpec
    from ...shared.generation import LocalPipeline, TokenEvent
    from ...shared.prepare import SplitParts
    from .config import ChatSettings
    from .engine import ChatEngine, Progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompareReport:
    """Both runs of one prompt: the shared ``Comparison``, the prompt's text, each run's
    figures (computed once, for the table) and the draft both ran with (``off``: none)."""

    prompt: str
    comparison: Comparison
    full: ReplyStats
    split: ReplyStats
    draft: str = "off"

    @classmethod
    def of(cls, prompt: str, comparison: Comparison, draft: str = "off") -> CompareReport:
        return cls(prompt, comparison, comparison.full_stats, comparison.split_stats, draft)


class Comparer:
    """Runs comparisons for the chat's engine (its model, plan and daemon).

    Thread-confined like the engine: one worker at a time.
    """

    def __init__(self, engine: ChatEngine) -> None:
        self.engine = engine
        self.parts: SplitParts | None = None
        self.full: LocalPipeline | None = None
        self._warm = False
        self._drafters: tuple[DraftSpec, dict[Mode, Drafter | None]] | None = None
        """The draft of the last run and each side's drafter of it."""

    @property
    def loaded(self) -> bool:
        return self.full is not None

    def load(self, progress: Progress) -> None:
        """Build the full model (with a bottom and top sharing its tensors), once."""
        if self.full is not None:
            return
        from ...shared import prepare
        from ...shared.generation import LocalPipeline
        from ...shared.models import resolve_device

        eng = self.engine
        if eng.model is None or eng.info_reply is None:
            raise SplitlmError("the chat model is not loaded yet (is the daemon up?)")
        device = resolve_device(eng.config.device)
        progress(f"loading the full model here ({eng.model.num_layers} layers)", 0, 1)
        parts = prepare.split_parts(
            eng.model, eng.info_reply, device, with_full=True, **eng.config.precisions()
        )
        assert parts.full is not None
        self.parts, self.full = parts, LocalPipeline(parts.full)
        progress("full model loaded", 1, 1)

    def run(
        self, prompt: str, settings: ChatSettings, progress: Progress, should_stop: Callable[[], bool] | None = None
    ) -> CompareReport:
        """Generate ``prompt``'s reply both ways (single turn, the chat template, the system
        prompt left out so the texts compare with ``splitlm compare``).

        Raises:
            DaemonUnreachable: the daemon went away during the split run.
        """
        from ...shared import prepare
        from ...shared.comparison import compare
        from ...shared.failover import NO_FAILOVER
        from ...shared.generation import prompt_ids

        self.load(progress)
        eng = self.engine
        assert eng.model is not None and eng.client is not None and self.parts is not None
        assert self.full is not None
        drafters = self._drafters_for(settings.draft_spec(), progress)
        ids = prompt_ids(eng.model.tokenizer, prompt, chat=True)
        gen = settings.generation()
        n = gen.max_new_tokens
        offset = {"full": 0, "split": n}
        labels = {"full": "full model, here", "split": "split, through the daemon"}

        def on_run(mode: str) -> None:
            progress(labels[mode], offset[mode], 2 * n)

        def on_token(mode: str, ev: TokenEvent) -> None:
            i = ev.index + 1
            if i == 1 or i % 8 == 0:
                progress(f"{mode}: {i} tokens", offset[mode] + i, 2 * n)

        if not self._warm:  # first calls pay one-off costs (allocator, kernels): not measured
            progress("warming up", 0, 2 * n)
        split = prepare.split_pipeline(self.parts, eng.client, retry=NO_FAILOVER)
        try:
            result = compare(
                self.full, split, eng.model.tokenizer, ids, gen, eng.model.eos_ids, warmup=not self._warm,
                on_run=on_run, on_token=on_token, should_stop=should_stop, drafters=drafters,
                draft_max=settings.draft_max,
            )
            self._warm = True
        finally:
            split.close()
        progress("done", 2 * n, 2 * n)
        return CompareReport.of(prompt, result, settings.draft)

    def _drafters_for(self, spec: DraftSpec, progress: Progress) -> dict[Mode, Drafter | None]:
        """One drafter of ``spec`` per side, built when the draft changed (the old ones closed).

        Raises:
            UsageError: the draft does not fit the model (``build_drafter``).
        """
        from ...shared.draft.build import build_drafter
        from ...shared.models import resolve_device

        if self._drafters is not None and self._drafters[0] == spec:
            return self._drafters[1]
        self.close_drafters()
        eng = self.engine
        assert eng.model is not None and self.parts is not None
        device = resolve_device(eng.config.device)
        if spec.enabled:
            progress(f"building the draft {spec}, one per side", 0, 1)
        built: dict[Mode, Drafter | None] = {}
        try:
            for mode in MODES:
                built[mode] = build_drafter(spec, eng.model, device, bottom=self.parts.bottom, top=self.parts.top)
        except BaseException:
            for d in built.values():
                if d is not None:
                    d.close()
            raise
        self._drafters = (spec, built)
        return built

    def close_drafters(self) -> None:
        drafters, self._drafters = self._drafters, None
        for d in (drafters[1].values() if drafters else ()):
            if d is not None:
                d.close()
