"""Full vs split: the same prompt through the whole model here and through the split, one after
the other, with the same settings. No UI here; the compare screen's worker calls it.

The full model is built once, together with its own bottom and top (the three share tensors, as
``splitlm compare`` builds them); each run opens a fresh trunk session and closes it after.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...shared.errors import SplitlmError
from .stats import Agreement, ReplyStats

if TYPE_CHECKING:
    from ...shared.generation import LocalPipeline
    from ...shared.session import SplitParts
    from .config import ChatSettings
    from .engine import ChatEngine, Progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompareReport:
    """Both runs of one prompt."""

    prompt: str
    prompt_tokens: int
    full_text: str
    split_text: str
    full: ReplyStats
    split: ReplyStats
    agreement: Agreement


class Comparer:
    """Runs comparisons for the chat's engine (its model, plan and daemon).

    Thread-confined like the engine: one worker at a time.
    """

    def __init__(self, engine: ChatEngine) -> None:
        self.engine = engine
        self.parts: SplitParts | None = None
        self.full: LocalPipeline | None = None
        self._warm = False

    @property
    def loaded(self) -> bool:
        return self.full is not None

    def load(self, progress: Progress) -> None:
        """Build the full model (with a bottom and top sharing its tensors), once."""
        if self.full is not None:
            return
        from ...shared import session as ss
        from ...shared.generation import LocalPipeline
        from ...shared.models import resolve_device, resolve_dtype

        eng = self.engine
        if eng.model is None or eng.info_reply is None:
            raise SplitlmError("the chat model is not loaded yet (is the daemon up?)")
        device = resolve_device(eng.config.device)
        dtype = resolve_dtype(eng.config.dtype, device)
        progress(f"loading the full model here ({eng.model.num_layers} layers)", 0, 1)
        parts = ss.split_parts(
            eng.model, eng.info_reply, dtype, device, with_full=True, weights=eng.config.local_weights()
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
        from ...shared import session as ss
        from ...shared.failover import NO_FAILOVER
        from ...shared.generation import GenerationSettings, generate, prompt_ids

        self.load(progress)
        eng = self.engine
        assert eng.model is not None and eng.client is not None and self.parts is not None
        assert self.full is not None
        tok, eos = eng.model.tokenizer, eng.model.eos_ids
        ids = prompt_ids(tok, prompt, chat=True)
        gen = settings.generation()
        n = gen.max_new_tokens
        split = ss.split_pipeline(self.parts, eng.client, retry=NO_FAILOVER)
        try:
            if not self._warm:  # first calls pay one-off costs (allocator, kernels): not measured
                progress("warming up", 0, 2 * n)
                warm = GenerationSettings(max_new_tokens=2, sampling=gen.sampling)
                for pipe in (self.full, split):
                    generate(pipe, tok, ids, warm, eos)
                self._warm = True

            def counter(label: str, offset: int) -> Callable[..., None]:
                def on_token(ev: object) -> None:
                    i = getattr(ev, "index", 0) + 1
                    if i == 1 or i % 8 == 0:
                        progress(f"{label}: {i} tokens", offset + i, 2 * n)

                return on_token

            progress("full model, here", 0, 2 * n)
            r_full = generate(self.full, tok, ids, gen, eos, on_token=counter("full", 0), should_stop=should_stop)
            progress("split, through the daemon", n, 2 * n)
            r_split = generate(split, tok, ids, gen, eos, on_token=counter("split", n), should_stop=should_stop)
        finally:
            split.close()
        progress("done", 2 * n, 2 * n)
        return CompareReport(
            prompt=prompt,
            prompt_tokens=len(ids),
            full_text=r_full.text,
            split_text=r_split.text,
            full=ReplyStats.of(r_full),
            split=ReplyStats.of(r_split),
            agreement=Agreement.of(r_full.token_ids, r_split.token_ids),
        )
