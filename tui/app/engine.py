"""The chat's engine: the client's parts, the trunk session and the conversation's cache state.

No UI here. The app's thread workers call it, one at a time (loads and replies never overlap);
``stop_reconnect`` may come from any thread. Generation is the shared loop
(``splitlm.shared.generation.generate``), the same one ``splitlm generate`` runs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

from ...shared.errors import SplitlmError, UsageError
from .stats import ReplyStats
from .turns import Message, TurnPlan, cached_after, conversation_ids, plan_turn

if TYPE_CHECKING:
    import torch

    from ...shared.client import TrunkClient
    from ...shared.draft.base import Drafter
    from ...shared.draft.spec import DraftSpec
    from ...shared.failover import FailoverEvent
    from ...shared.generation import GenerationResult, SplitPipeline, TokenEvent
    from ...shared.prepare import LoadedModel, SplitParts
    from .config import AppConfig, ChatSettings

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
"""``(what is happening, steps done, steps in all)``, called on the worker's thread."""

LOAD_STEPS = 5
"""Stages of ``ChatEngine.load``: imports, the daemon's plan, the model's config and tokenizer,
the bottom and top weights, the trunk session."""


class ConversationFull(SplitlmError):
    """The conversation already fills the daemon's context limit."""


@dataclass(frozen=True)
class PlanInfo:
    """What the Settings screen and the status bar show of the plan (read-only)."""

    model: str
    family: str
    layers: int
    split: tuple[int, int]
    fingerprint: str
    address: str
    trunk_device: str
    server_version: str
    max_context: int
    local_device: str
    local_dtype: str


@dataclass(frozen=True)
class ReplyOutcome:
    """A finished (or stopped) reply with its plan and figures."""

    result: GenerationResult
    plan: TurnPlan
    stats: ReplyStats
    wall_s: float
    draft: str = "off"
    """The draft the reply used (``--draft`` spelling)."""
    refused_draft: str = ""
    """A draft chosen for this reply that could not be built (the reply used ``draft``)."""
    draft_error: str = ""
    """Why ``refused_draft`` was refused."""


def quiet_libraries() -> None:
    """transformers' warnings and progress bars would write over the app's screen."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


class ChatEngine:
    """Model parts, trunk client and session for one chat app.

    Args:
        config: the app's start-up configuration (address, model, dtype, device, retry).
    """

    def __init__(self, config: AppConfig) -> None:
        self.config = config
        self.client: TrunkClient | None = None
        self.model: LoadedModel | None = None
        self.parts: SplitParts | None = None
        self.pipeline: SplitPipeline | None = None
        self.info_reply: Any = None
        self.plan: PlanInfo | None = None
        self.cached: list[int] = []
        """Ids whose keys and values the caches hold (the trunk's, the bottom's and the top's)."""
        self.last_plan: TurnPlan | None = None
        self.on_failover: Callable[[FailoverEvent], None] | None = None
        """Told of reconnect attempts and resumes (on the stepping thread)."""
        self._reconnecting = threading.Event()
        self._broken = False
        self.device: torch.device | None = None
        self.drafter: Drafter | None = None
        """The replies' drafter, reused from reply to reply until the draft setting changes."""
        self.draft: DraftSpec | None = None
        """What ``drafter`` was built from (None: nothing built yet)."""
        self._staged: tuple[DraftSpec, Drafter | None] | None = None
        """A drafter built by ``check_draft`` that takes over at the next reply asking for it."""
        self._draft_lock = threading.Lock()
        """``check_draft`` (the settings screen's worker) may run while a reply does."""

    @property
    def loaded(self) -> bool:
        return self.pipeline is not None

    def _client(self) -> TrunkClient:
        if self.client is None:
            self.client = self.config.new_client()
        return self.client

    def load(self, progress: Progress) -> PlanInfo:
        """Ask the daemon for its plan, load the matching bottom and top, open a session.

        Each stage is told through ``progress`` before it starts (``LOAD_STEPS`` in all), so the
        app can say what the 15-30 s of a start go to while it holds the user's first prompt.

        Raises:
            DaemonUnreachable: nothing answers at the address.
            SplitlmError: the model here does not match the daemon's, or cannot load.
        """
        total = LOAD_STEPS
        t0 = time.perf_counter()

        def step(label: str, done: int) -> None:
            log.info("load %d/%d at %.2f s: %s", done, total, time.perf_counter() - t0, label)
            progress(label, done, total)

        step("loading torch and transformers", 0)
        from ...shared import prepare
        from ...shared.models import resolve_device

        quiet_libraries()
        step(f"asking the daemon at {self.config.trunk} for its plan", 1)
        client = self._client()
        info = client.info()
        named = self.config.model or info.plan.model_id
        step(f"reading the model {PurePath(named).name or named} (config, tokenizer)", 2)
        model = prepare.load_model(prepare.client_model_spec(self.config.model, info))
        device = resolve_device(self.config.device)
        a, b = info.plan.trunk_start, info.plan.trunk_end
        step(f"loading the bottom [0, {a}) and top [{b}, {info.plan.num_layers}) weights", 3)
        parts = prepare.split_parts(model, info, device, **self.config.precisions())
        step(f"connecting to the trunk at {client.address}", 4)
        with self._draft_lock:
            self.close_drafts()  # built for the model and parts being replaced
        self.model, self.parts, self.info_reply, self.device = model, parts, info, device
        self._open_pipeline()
        step("ready", total)
        p = info.plan
        self.plan = PlanInfo(
            model=model.source.model_id,
            family=p.family,
            layers=model.num_layers,
            split=(a, b),
            fingerprint=parts.fingerprint.digest,
            address=client.address,
            trunk_device=p.device,
            server_version=info.server_version,
            max_context=int(info.limits.max_context),
            local_device=str(device),
            local_dtype=parts.fingerprint.precision,
        )
        log.info("engine ready in %.2f s: %s", time.perf_counter() - t0, self.plan)
        return self.plan

    def _open_pipeline(self) -> None:
        from ...shared import prepare

        assert self.parts is not None and self.client is not None
        if self.pipeline is not None:
            self.pipeline.close()
            self.pipeline = None
        self.pipeline = prepare.split_pipeline(  # retry None: split_pipeline's default policy
            self.parts, self.client, wire_dtype=self.config.wire_torch_dtype(), retry=self.config.retry,
            on_reconnect=self._failover,
        )
        self.cached = []
        self._broken = False

    def _failover(self, event: FailoverEvent) -> None:
        from ...shared.failover import Reconnecting

        if isinstance(event, Reconnecting):
            self._reconnecting.set()
        else:
            self._reconnecting.clear()
        if self.on_failover is not None:
            self.on_failover(event)

    def reconnect(self, progress: Progress) -> PlanInfo:
        """The retry key: load when nothing is loaded, else open a new session (the next reply
        rebuilds the trunk cache from the conversation); a daemon that now serves another plan
        means a full reload."""
        if self.parts is None or self.client is None:
            return self.load(progress)
        progress(f"asking the daemon at {self.config.trunk} for its plan", 0, 2)
        info = self.client.info()
        if info.plan.fingerprint != self.parts.fingerprint.digest:
            log.info("the daemon's plan changed (%s): reloading", info.plan.fingerprint)
            self.close_session()
            self.parts = None
            return self.load(progress)
        progress(f"connecting to the trunk at {self.client.address}", 1, 2)
        self._open_pipeline()
        progress("ready", 2, 2)
        assert self.plan is not None
        return self.plan

    def reply(
        self,
        messages: Sequence[Message],
        settings: ChatSettings,
        floor: int | None = None,
        on_token: Callable[[TokenEvent], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> ReplyOutcome:
        """Generate the reply to ``messages`` (which end with the user's prompt).

        Args:
            floor: regenerate/edit: step again from at most this position (the replaced turn's
                own start), so the new reply is computed exactly as the first one was.

        Raises:
            DaemonUnreachable: the daemon went away and did not come back in time (the partial
                reply was already streamed through ``on_token``).
            ConversationFull: no room left in the daemon's context limit.
        """
        if self.model is None or self.parts is None:
            raise SplitlmError("the model is not loaded yet")
        if self._broken or self.pipeline is None:
            self._open_pipeline()
        from ...shared.generation import generate

        full = conversation_ids(self.model.tokenizer, messages, settings.system_prompt)
        plan = plan_turn(self.cached, full, floor)
        gen = settings.generation()
        limit = self.plan.max_context if self.plan else 0
        if limit:
            room = limit - len(full)
            if room < 1:
                raise ConversationFull(
                    f"the conversation is {len(full)} tokens; the daemon allows {limit}: start a new chat"
                )
            gen = replace(gen, max_new_tokens=min(gen.max_new_tokens, room))
        log.info("reply: %d prompt ids, stepping %d at position %d", len(full), len(plan.ids), plan.start)
        refused, draft_error = "", ""
        try:
            drafter = self._drafter_for(settings.draft_spec())
        except UsageError as e:  # the reply goes on with the draft it had (check_draft refuses it earlier)
            log.warning("draft %s refused: %s", settings.draft, e)
            refused, draft_error, drafter = settings.draft, str(e), self.drafter
        used = self.draft_in_use
        t0 = time.perf_counter()
        assert self.pipeline is not None
        try:
            result = generate(
                self.pipeline, self.model.tokenizer, list(plan.ids), gen, self.model.eos_ids,
                on_token=on_token, should_stop=should_stop, start_position=plan.start,
                drafter=drafter, draft_max=settings.draft_max, history=plan.full[: plan.start],
            )
        except BaseException:
            self._broken = True  # the caches no longer match anything we know: rebuild next time
            self.cached = []
            self._reconnecting.clear()
            raise
        self.cached = cached_after(plan, result.token_ids)
        self.last_plan = plan
        outcome = ReplyOutcome(
            result, plan, ReplyStats.of(result), time.perf_counter() - t0, used, refused, draft_error
        )
        s = outcome.stats
        # scripts/bench_chat.py reads this line (INFO) to compare the app with `splitlm generate`
        log.info(
            "reply done: %d tokens (%s), %.3f tok/s, TTFT %.1f ms, p50 %.2f ms, %.2f s",
            s.tokens, result.finish_reason, s.tokens_per_s, s.ttft_s * 1e3, s.p50_s * 1e3, outcome.wall_s,
        )
        if drafter is not None:
            log.info(
                "reply draft %s: %d steps, %.2f tokens/step, %d drafted, %d accepted",
                used, result.steps, result.tokens_per_step, result.drafted, result.accepted,
            )
        return outcome

    # --- drafts ---

    @property
    def draft_in_use(self) -> str:
        """The draft of the reply running or last run (``off``: none); the UI thread reads it
        during a reply, when only the reply's thread could change it, and does not."""
        return str(self.draft) if self.drafter is not None and self.draft is not None else "off"

    def _build_drafter(self, spec: DraftSpec) -> Drafter | None:
        """Raises ``UsageError``: the draft does not fit the model (``build_drafter``)."""
        from ...shared.draft.build import build_drafter

        assert self.model is not None and self.parts is not None and self.device is not None
        t0 = time.perf_counter()
        drafter = build_drafter(spec, self.model, self.device, bottom=self.parts.bottom, top=self.parts.top)
        log.info("draft %s built in %.2f s", spec, time.perf_counter() - t0)
        return drafter

    def check_draft(self, spec: DraftSpec) -> None:
        """Build the drafter ``spec`` names now, so that one that cannot work is refused where it
        was chosen (the settings screen); it takes over at the next reply that asks for it, and
        the reply running meanwhile keeps its own. Any worker thread; a no-op before the model
        loads (the first reply builds it then).

        Raises:
            UsageError: the draft does not fit the model (another tokenizer, a student made for
                another model or plan, a missing or corrupt checkpoint); nothing changes.
        """
        with self._draft_lock:
            if self.model is None or spec == self.draft or (self._staged and self._staged[0] == spec):
                return
            drafter = self._build_drafter(spec)
            self._unstage()
            self._staged = (spec, drafter)

    def _drafter_for(self, spec: DraftSpec) -> Drafter | None:
        """The drafter for a reply asking for ``spec``: the one in use when it is the same, the
        staged one, or a new one; a drafter replaced is closed. The reply's thread.

        Raises:
            UsageError: a new drafter could not be built; the one in use stays.
        """
        with self._draft_lock:
            if spec != self.draft:
                if self._staged is not None and self._staged[0] == spec:
                    new, self._staged = self._staged[1], None
                else:
                    new = self._build_drafter(spec)
                self.close_drafts()
                self.drafter, self.draft = new, spec
            self._unstage()
            return self.drafter

    def _unstage(self) -> None:
        staged, self._staged = self._staged, None
        if staged is not None and staged[1] is not None:
            staged[1].close()

    def close_drafts(self) -> None:
        """Close the drafter in use and a staged one; the next reply builds what it asks for."""
        self._unstage()
        old, self.drafter, self.draft = self.drafter, None, None
        if old is not None:
            old.close()

    def stop_reconnect(self) -> None:
        """Esc while the session is reconnecting: give up now (any thread)."""
        pipe = self.pipeline
        if self._reconnecting.is_set() and pipe is not None:
            pipe.session.cancel()

    def forget_cache(self) -> None:
        """After a new chat or an opened conversation nothing needs to change: the next turn
        reuses whatever prefix the cache shares with it. This only drops the regenerate floor."""
        self.last_plan = None

    def close_session(self) -> None:
        if self.pipeline is not None:
            self.pipeline.close()
            self.pipeline = None

    def close(self) -> None:
        self.close_session()
        with self._draft_lock:
            self.close_drafts()
        if self.client is not None:
            self.client.close()
            self.client = None
