"""The one generation loop: used by the split path and the full path alike, by every front end.

A *pipeline* turns token ids at positions ``[p, p + t)`` into the logits of the last position:
``LocalPipeline`` runs the whole model here, ``SplitPipeline`` runs bottom here, trunk in the
daemon, top here. The loop tokenizes, steps the pipeline, samples, detokenizes incrementally and
reports every token to a callback with its timings.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch

from .draft.base import Draft
from .draft.control import DraftControl
from .draft.verify import verify
from .errors import StepRefused
from .sampling import Sampler, SamplingSettings

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from .client import RemoteSession
    from .draft.base import Drafter
    from .models import Part, PartChain

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepOutput:
    """What one pipeline step returns.

    Attributes:
        logits: the logits of the step's last ``logits_for`` positions, ``(n, V)``; the last row
            is the next token's.
        client_s: compute time spent on this machine (bottom, top).
        trunk_s: the daemon's own compute time for the step (0 for a local pipeline).
    """

    logits: torch.Tensor
    client_s: float
    trunk_s: float = 0.0


class Pipeline(Protocol):
    """Runs a model's steps for one session; ``position`` below the cached length rolls back."""

    def step(self, ids: Sequence[int], position: int, logits_for: int = 1) -> StepOutput: ...

    @property
    def bytes_sent(self) -> int: ...

    @property
    def bytes_received(self) -> int: ...

    @property
    def link_ratio(self) -> float:
        """The round trip beside a one-position step's compute, as a multiple of it (0 here and
        now for a local pipeline); what a draft's length control weighs a round trip at."""
        ...

    def close(self) -> None: ...


class TokenLog:
    """The token ids a pipeline's caches hold, so that a rollback below what their sliding-window
    layers keep (``rollback_floor``) becomes a re-prefill: one step at position 0 carrying every
    id up to the new ones, exactly what a fresh session given that prompt would step.

    The full and the split pipeline re-prefill at the same steps (the floor is a function of the
    steps' positions alone), so their greedy continuations stay token-identical.
    """

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.valid = 0
        """Positions every cache holds as ``ids`` say: a step the trunk refused leaves the bottom
        cache overwritten from its position, so later steps start again from there."""

    def rewind(self, ids: Sequence[int], position: int, floor: int) -> tuple[list[int], int]:
        """The step to run for ``ids`` at ``position``: itself; from ``valid`` when a refused
        step overwrote the positions before it; from 0 when that is below ``floor``."""
        start = min(position, self.valid)
        if 0 < start < floor:
            log.info("rollback to %d is below what sliding windows keep (%d): re-prefilling %d ids",
                     start, floor, position + len(ids))
            start = 0
        return self.ids[start:position] + list(ids), start

    def ran(self, ids: Sequence[int], position: int) -> None:
        """Record a step that ran."""
        del self.ids[position:]
        self.ids.extend(ids)
        self.valid = len(self.ids)

    def refused(self, position: int) -> None:
        """The trunk refused a step at ``position`` after the bottom ran it."""
        self.valid = min(self.valid, position)


class LocalPipeline:
    """The whole model in this process (``--full``): one ``Part``, or a ``PartChain`` when its
    parts run at different precisions."""

    link_ratio = 0.0

    def __init__(self, full: Part | PartChain) -> None:
        self.part = full
        self.cache: Any = full.new_cache()  # the part's own kind: a PartCache, a chain's ChainCache
        self.tokens = TokenLog()
        self.bytes_sent = 0
        self.bytes_received = 0

    def step(self, ids: Sequence[int], position: int, logits_for: int = 1) -> StepOutput:
        t0 = time.perf_counter()
        ids, position = self.tokens.rewind(ids, position, self.cache.rollback_floor)
        logits = self.part.forward(torch.tensor([ids]), position, self.cache, logits_for=logits_for)
        self.tokens.ran(ids, position)
        return StepOutput(logits[0], time.perf_counter() - t0)

    def close(self) -> None:
        self.cache = self.part.new_cache()
        self.tokens = TokenLog()


class SplitPipeline:
    """Bottom and top here, trunk in the daemon; only hidden states cross the wire.

    With a ``FailoverSession`` a broken stream costs a pause inside ``step`` (reconnect, replay of
    the recorded steps), not the conversation; the bottom and top caches here are not touched.
    """

    def __init__(self, bottom: Part, session: RemoteSession, top: Part) -> None:
        self.bottom, self.session, self.top = bottom, session, top
        self.bottom_cache = bottom.new_cache()
        self.top_cache = top.new_cache()
        self.tokens = TokenLog()
        self._link = _LinkEstimate()

    @property
    def bytes_sent(self) -> int:
        return self.session.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self.session.bytes_received

    @property
    def link_ratio(self) -> float:
        return self._link.ratio

    @property
    def rollback_floor(self) -> int:
        """The lowest position a step may start from without a re-prefill (all three caches)."""
        return max(self.bottom_cache.rollback_floor, self.session.rollback_floor, self.top_cache.rollback_floor)

    def step(self, ids: Sequence[int], position: int, logits_for: int = 1) -> StepOutput:
        t0 = time.perf_counter()
        ids, position = self.tokens.rewind(ids, position, self.rollback_floor)
        h = self.bottom.forward(torch.tensor([ids]), position, self.bottom_cache)
        t1 = time.perf_counter()
        try:
            h2, trunk_s = self.session.step(h, position)
        except StepRefused:
            self.tokens.refused(position)  # the session is as it was; the bottom cache is not
            raise
        t2 = time.perf_counter()
        logits = self.top.forward(h2, position, self.top_cache, logits_for=logits_for)
        t3 = time.perf_counter()
        self._link.add(len(ids), (t1 - t0) + (t3 - t2) + trunk_s, (t2 - t1) - trunk_s)
        self.tokens.ran(ids, position)
        return StepOutput(logits[0], (t1 - t0) + (t3 - t2), trunk_s)

    def close(self) -> None:
        self.session.close()


class _LinkEstimate:
    """A split session's round trip beside its compute, from its steps' timings.

    Both are running means over recent steps of few positions (decode and verification steps; a
    prefill's compute says little about a decode step's): ``link`` is a step's wall time less
    all compute (wire, serialisation, scheduling), ``compute`` the bottom, trunk and top.
    """

    WEIGHT = 0.2
    MAX_POSITIONS = 16

    def __init__(self) -> None:
        self.link_s: float | None = None
        self.compute_s: float | None = None

    def add(self, positions: int, compute_s: float, link_s: float) -> None:
        if self.link_s is None or self.compute_s is None:
            self.link_s, self.compute_s = max(link_s, 0.0), compute_s
            return
        if positions > self.MAX_POSITIONS:
            return
        w = self.WEIGHT
        self.link_s += w * (max(link_s, 0.0) - self.link_s)
        self.compute_s += w * (compute_s - self.compute_s)

    @property
    def ratio(self) -> float:
        if not self.link_s or not self.compute_s:
            return 0.0
        return self.link_s / self.compute_s


@dataclass(frozen=True)
class GenerationSettings:
    """What to generate.

    Attributes:
        max_new_tokens: at most this many tokens (the end token counts).
        stop: stop strings; the text ends before the first one found.
        sampling: how each token is chosen.
    """

    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    sampling: SamplingSettings = field(default_factory=SamplingSettings)

    def __post_init__(self) -> None:
        from .errors import UsageError

        if self.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")


@dataclass(frozen=True)
class TokenLogprobs:
    """A generated token's log-probability under the model (the logits' log-softmax, before
    temperature, top-k or top-p), and the most likely alternatives at its position.

    Attributes:
        logprob: the chosen token's.
        top: the ``top_logprobs`` most likely tokens there, most likely first, as
            ``(token_id, logprob)``; empty when none were asked for.
    """

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> TokenLogprobs:
    """``token``'s log-probability in one position's ``logits`` ``(V,)`` and the ``top`` best."""
    logp = torch.log_softmax(logits.to(torch.float32), dim=-1)
    best: tuple[tuple[int, float], ...] = ()
    if top > 0:
        values, ids = torch.topk(logp, min(top, logp.numel()))
        best = tuple((int(i), float(v)) for i, v in zip(ids, values))
    return TokenLogprobs(float(logp[token]), best)


@dataclass(frozen=True)
class TokenEvent:
    """One generated token, as the callback sees it.

    Attributes:
        index: 0 for the first generated token.
        token_id: the token.
        delta: text that became final with this token (may be empty).
        latency_s: time since the previous token (for the first: since the start, the TTFT).
        client_s, trunk_s: compute here and in the daemon for the step that produced it.
        steps: pipeline steps (round trips, for the split) of this reply so far, the prefill's
            included.
        drafted, accepted: draft tokens proposed and accepted in this reply so far (0 without a
            draft); ``accepted / drafted`` is the acceptance rate, ``index + 1`` over ``steps``
            the tokens per round trip.
        logprobs: the token's log-probability and alternatives, when ``generate`` was asked
            for them (``logprobs=``); None otherwise.
    """

    index: int
    token_id: int
    delta: str
    latency_s: float
    client_s: float
    trunk_s: float
    steps: int = 1
    drafted: int = 0
    accepted: int = 0
    logprobs: TokenLogprobs | None = None


@dataclass
class GenerationResult:
    """A finished generation, with what the CLI's ``--json`` prints."""

    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"
    ttft_s: float = 0.0
    per_token_s: list[float] = field(default_factory=list)
    client_compute_s: list[float] = field(default_factory=list)
    trunk_compute_s: list[float] = field(default_factory=list)
    bytes_sent: int = 0
    bytes_received: int = 0
    steps: int = 0
    """Pipeline steps (round trips for the split), the prefill's included."""
    drafted: int = 0
    """Draft tokens proposed (0 without a draft)."""
    accepted: int = 0
    """Draft tokens the model accepted."""
    draft_s: float = 0.0
    """Compute spent drafting (part of ``client_compute_s``)."""

    @property
    def acceptance(self) -> float | None:
        """Accepted over drafted tokens; None when nothing was drafted."""
        return self.accepted / self.drafted if self.drafted else None

    @property
    def tokens_per_step(self) -> float:
        """Generated tokens per pipeline step (1 at most without a draft)."""
        return len(self.token_ids) / self.steps if self.steps else 0.0

    def add_token(self, token: int, latency_s: float, client_s: float, trunk_s: float) -> None:
        """Record a generated token and its timings; the first token's latency is the TTFT."""
        if not self.token_ids:
            self.ttft_s = latency_s
        else:
            self.per_token_s.append(latency_s)
        self.client_compute_s.append(client_s)
        self.trunk_compute_s.append(trunk_s)
        self.token_ids.append(token)


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, chat: bool) -> list[int]:
    """Token ids of a one-turn prompt: the chat template when ``chat`` and the model has one,
    else the raw text with the tokenizer's default special tokens."""
    if chat and getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(out, Mapping):  # a BatchEncoding (a UserDict) from newer transformers
            out = out["input_ids"]
        return [int(i) for i in cast("list[int]", out)]  # one conversation: one list of ids
    return [int(i) for i in tokenizer(prompt)["input_ids"]]


class _Detokenizer:
    """Incremental text: a delta becomes final once no stop string could still begin in it and
    it does not end in a partial UTF-8 character.

    Each push decodes a short window, not the whole reply: the last tokens that spelled some text
    alone (``prefix_text``) and with the new ones (``window_text``); the new text is what the
    window adds. Decoding the whole reply every token cost 0.24 ms at 1000 tokens on SmolLM2's
    tokenizer and grew with the reply. A tokenizer whose spelling of the window's start depends
    on tokens before it (the window no longer starts with ``prefix_text``) gets the whole reply
    decoded for that push instead.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.emitted = ""
        self.decoded = ""  # the text of ids[:read]
        self.prefix = 0  # the window starts here: the last tokens that spelled some text
        self.read = 0

    def text(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        assert isinstance(text, str)  # one sequence of ids decodes to one string
        return text

    def _advance(self, ids: list[int]) -> bool:
        """Extend ``decoded`` to all of ``ids``; False while they end in a partial character."""
        prefix_text = self.text(ids[self.prefix : self.read])
        window_text = self.text(ids[self.prefix :])
        if window_text.endswith("\ufffd"):
            return False  # a partial UTF-8 character: wait for the token that completes it
        if window_text.startswith(prefix_text):
            self.decoded += window_text[len(prefix_text) :]
        else:
            self.decoded = self.text(ids)
        if len(window_text) > len(prefix_text):
            # the new tokens spelled something: they start the next window. Tokens that spell
            # nothing (skipped specials) never do: a window starting there would lose the space
            # a SentencePiece decoder drops at the start of a text
            self.prefix = self.read
        self.read = len(ids)
        return True

    def push(self, ids: list[int]) -> tuple[str, bool]:
        """The new final text after ``ids``, and whether a stop string was reached."""
        searched = len(self.decoded)
        if not self._advance(ids):
            return "", False
        full = self.decoded
        for s in self.stop:  # only where the new text could complete one: earlier ones stopped us
            at = full.find(s, max(0, searched - len(s) + 1))
            if s and at >= 0:
                return self._emit(full[:at]), True
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(full)), 0, -1):
                if full.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return self._emit(full[: len(full) - hold]), False

    def _emit(self, upto: str) -> str:
        if not upto.startswith(self.emitted):  # the tokenizer re-spelled earlier text: no retraction
            return ""
        delta = upto[len(self.emitted) :]
        self.emitted = upto
        return delta

    def finish(self, ids: list[int], stopped: bool) -> str:
        """The final text."""
        return self.emitted if stopped else self.text(ids)


def generate(
    pipeline: Pipeline,
    tokenizer: PreTrainedTokenizerBase,
    ids: list[int],
    settings: GenerationSettings,
    eos_ids: Sequence[int],
    on_token: Callable[[TokenEvent], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    start_position: int = 0,
    drafter: Drafter | None = None,
    draft_max: int = 8,
    history: Sequence[int] = (),
    draft_link: float | None = None,
    logprobs: int | None = None,
) -> GenerationResult:
    """Generate a reply to ``ids``.

    Args:
        pipeline: local or split; its caches already hold the conversation's tokens at positions
            ``[0, start_position)`` (failover keeps its own record of them to replay).
        tokenizer: for the streamed text.
        ids: the new prompt tokens, placed at ``start_position``.
        settings: length, stop strings, sampling.
        eos_ids: tokens that end the reply (kept in ``token_ids``, not in the text).
        on_token: called for every generated token, in order, on the calling thread.
        should_stop: polled between steps; True ends the reply with ``finish_reason="cancelled"``.
        start_position: where ``ids`` go; below the pipeline's cached length rolls it back.
        drafter: proposes tokens that one step verifies several at a time (speculative
            decoding, ``shared.draft``); None decodes one token per step.
        draft_max: the longest draft (``--draft-max``).
        history: the conversation's tokens before ``ids`` (what a drafter may look up).
        draft_link: the round trip as a multiple of a step's compute, for the draft's length
            control; None takes the pipeline's estimate after the prefill. Two runs given the
            same value verify the same chunks (``compare`` gives both the split's).
        logprobs: None (the default) computes none; N gives each ``TokenEvent`` its token's
            log-probability and the N most likely tokens at its position (``splitlm serve``'s
            ``logprobs``/``top_logprobs``).

    Returns:
        The result, with per-token timings, wire bytes, steps and draft counts.
    """
    result = GenerationResult(prompt_ids=list(ids))
    sampler = Sampler(settings.sampling)
    detok = _Detokenizer(tokenizer, settings.stop)
    eos = set(eos_ids)
    bytes0 = (pipeline.bytes_sent, pipeline.bytes_received)
    clock = _TokenClock()
    control: DraftControl | None = None
    context = [*history, *ids]
    step_ids: list[int] = list(ids)
    position = start_position
    draft = Draft([])
    stopped = False
    while True:
        if should_stop is not None and should_stop():
            result.finish_reason = "cancelled"
            break
        out = pipeline.step(step_ids, position, logits_for=len(draft.tokens) + 1)
        t0 = time.perf_counter()
        if draft.tokens:
            tokens, accepted = verify(out.logits, draft, sampler)
            assert control is not None  # a draft exists only with a drafter
            control.verified(len(draft.tokens), accepted)
            result.drafted += len(draft.tokens)
            result.accepted += accepted
        else:
            tokens, accepted = [sampler(out.logits[-1])], 0
        client_s, trunk_s = out.client_s + draft.seconds + (time.perf_counter() - t0), out.trunk_s
        result.steps += 1
        result.draft_s += draft.seconds
        position += len(step_ids) - len(draft.tokens) + accepted  # the positions kept
        for j, token in enumerate(tokens):
            # a verified chunk's j-th token was chosen from its j-th row; a plain step's from the last
            lp = None if logprobs is None else token_logprobs(
                out.logits[j] if draft.tokens else out.logits[-1], token, logprobs
            )
            latency = clock.tick()
            result.add_token(token, latency, client_s, trunk_s)
            context.append(token)
            delta, stopped = ("", False) if token in eos else detok.push(result.token_ids)
            if on_token is not None:
                on_token(TokenEvent(len(result.token_ids) - 1, token, delta, latency, client_s,
                                    trunk_s, result.steps, result.drafted, result.accepted, lp))
            client_s = trunk_s = 0.0  # a step's compute is counted once, on its first token
            if token in eos or stopped:
                result.finish_reason = "eos" if token in eos else "stop"
                break
            if len(result.token_ids) >= settings.max_new_tokens:
                break
        if result.finish_reason != "length" or len(result.token_ids) >= settings.max_new_tokens:
            break
        step_ids = [tokens[-1]]
        draft = Draft([])
        if drafter is not None:
            if control is None:  # after the prefill: its round trip counts
                link = pipeline.link_ratio if draft_link is None else draft_link
                control = DraftControl(draft_max, drafter.cost, link)
            k = control.next_length(settings.max_new_tokens - len(result.token_ids) - 1)
            if k > 0:
                draft = drafter.propose(context, k, settings.sampling, sampler.generator)
                draft = Draft(draft.tokens[:k], None if draft.probs is None else draft.probs[:k], draft.seconds)
                step_ids.extend(draft.tokens)
    # text still held back (a partial stop string or character at the very end) is in
    # ``result.text``; a streaming front end prints ``result.text[len(streamed):]`` last
    result.text = detok.finish(result.token_ids, stopped)
    result.bytes_sent = pipeline.bytes_sent - bytes0[0]
    result.bytes_received = pipeline.bytes_received - bytes0[1]
    return result


class _TokenClock:
    """Time between tokens, taken once each token is sampled; the first token's is from the
    start of the generation (its TTFT)."""

    def __init__(self) -> None:
        self._last = time.perf_counter()

    def tick(self) -> float:
        """Seconds since the previous token (or the start)."""
        now = time.perf_counter()
        latency, self._last = now - self._last, now
        return latency
