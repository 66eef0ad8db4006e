"""Failover during a drafted reply (issue 12, exactness): the daemon is killed -9 between two
verification steps and restarted; the reply goes on and equals an uninterrupted split run with
the same draft, step for step and bit for bit.

A drafted reply is the hard case for the step history: a verification step of k + 1 positions
whose draft was partly rejected is followed by a step that starts inside it (the trunk rolls
back). The history keeps such a step whole and the next one rolls back again on replay, so the
rebuilt cache holds what the lost one held; this test kills the daemon right after such a
rollback, before a multi-position step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from splitlm.shared.draft.ngram import NgramDrafter
from splitlm.shared.failover import FailoverSession, Resumed
from splitlm.shared.generation import GenerationResult, GenerationSettings, generate
from tests.conftest import Daemon, start_daemon
from tests.shared.test_engine import _NoText

from .helpers import FAST_RETRY, PROMPT, Factory, Models, Recording, TokenEvent, connect
from .test_failover import SPLIT

GROUNDED = PROMPT + PROMPT[:10]
"""A prompt that repeats itself: prompt lookup has runs to propose, so drafts get verified."""
TOKENS = 40


@dataclass
class StepLog:
    """Wraps a session: the ``(position, positions)`` of every step the trunk is sent."""

    inner: Any
    steps: list[tuple[int, int]] = field(default_factory=list)

    def step(self, hidden: torch.Tensor, position: int) -> tuple[torch.Tensor, float]:
        self.steps.append((position, int(hidden.shape[1])))
        out: tuple[torch.Tensor, float] = self.inner.step(hidden, position)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _drafted(pipe: Recording, on_token: Any = None) -> GenerationResult:
    """Greedy ``TOKENS`` tokens of ``GROUNDED`` with an ``ngram`` draft (end tokens do not stop it)."""
    return generate(pipe, _NoText(), list(GROUNDED), GenerationSettings(max_new_tokens=TOKENS), [],  # type: ignore[arg-type]
                    on_token=on_token, drafter=NgramDrafter(), draft_max=8,
                    draft_link=1.0)  # fixed, not the timed estimate: both runs draft the same lengths


def _history(steps: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The steps a trunk cache still reflects after ``steps``: each step erases the earlier ones
    that start at or after its position (their positions are overwritten)."""
    kept: list[tuple[int, int]] = []
    for p, t in steps:
        kept = [s for s in kept if s[0] < p] + [(p, t)]
    return kept


def _kill_point(steps: Sequence[tuple[int, int]]) -> int:
    """The index of a step to interrupt: one of several positions, sent after a step that rolled
    the trunk back into a multi-position step the history keeps whole."""
    for i in range(2, len(steps)):
        kept = _history(steps[:i])
        rolled_into = any(p < kept[-1][0] < p + t for p, t in kept[:-1])
        if steps[i][1] > 1 and rolled_into:
            return i
    raise AssertionError(f"no step fits: {steps}")


@pytest.mark.parametrize("kind", ["gemma2"])  # sliding windows and full attention both
def test_kill9_between_verification_steps_resumes_bit_identical(
    tiny_models: Models, daemon_factory: Factory, tmp_path: Path, kind: str
) -> None:
    """Gemma 2's sliding-window layers add rollbacks the window must cover (or re-prefills)."""
    model = tiny_models[kind]
    d = daemon_factory(model, *SPLIT)
    split = connect(d.address, model)
    ref = Recording(split.pipeline())
    ref_log = StepLog(ref.inner.session)
    ref.inner.session = ref_log
    ref_events: list[TokenEvent] = []
    want = _drafted(ref, ref_events.append)
    ref.close()
    assert want.accepted > 0 and want.accepted < want.drafted  # kept and rejected drafts
    interrupt = _kill_point(ref_log.steps)
    # ``steps`` counts the steps so far: the tokens of step ``interrupt - 1`` have ``interrupt``
    kill_at = max(ev.index for ev in ref_events if ev.steps == interrupt)

    box: dict[str, Daemon] = {}
    restarts: list[threading.Thread] = []
    events: list[object] = []

    def on_token(ev: TokenEvent) -> None:
        if ev.index == kill_at:  # the last token of the step before ``interrupt``
            d.proc.kill()
            d.proc.wait()
            restarts.append(_restart_later(model, d, tmp_path / "restarted.log", box))

    pipe = Recording(split.pipeline(FAST_RETRY, events.append))
    session = pipe.inner.session
    assert isinstance(session, FailoverSession)
    log = StepLog(session)
    pipe.inner.session = log
    try:
        got = _drafted(pipe, on_token)
        restarts[0].join()
        assert got.token_ids == want.token_ids
        assert (got.steps, got.drafted, got.accepted) == (want.steps, want.drafted, want.accepted)
        assert log.steps == ref_log.steps  # the same verification chunks, the resumed one included
        assert len(pipe.logits) == len(ref.logits)
        for i, (a, b) in enumerate(zip(pipe.logits, ref.logits)):
            assert torch.equal(a, b), f"step {i} ({a.shape[0]} positions) differs after the failover"
        resumed = [e for e in events if isinstance(e, Resumed)]
        assert len(resumed) == 1
        # the replay sent what the lost cache reflected, rolled-into steps whole, then the
        # interrupted step
        replayed = _history(ref_log.steps[: interrupt + 1])
        assert resumed[0].replayed_steps == len(replayed)
        assert resumed[0].replayed_positions == sum(t for _, t in replayed)
    finally:
        pipe.close()
        split.close()
        if "daemon" in box:
            assert box["daemon"].stop() == 0


def _restart_later(model: Path, d: Daemon, log: Path, box: dict[str, Daemon]) -> threading.Thread:
    def run() -> None:
        time.sleep(0.5)
        box["daemon"] = start_daemon(model, d.address, log, *SPLIT)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t
