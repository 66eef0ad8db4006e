"""What the failure tests share: sizes (CI or long), waiting, in-process split clients of a
daemon subprocess, and the daemon's resident memory."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psutil
import torch

from splitlm.protos import trunk_pb2 as pb
from splitlm.shared import prepare
from splitlm.shared.client import TrunkClient
from splitlm.shared.failover import NO_FAILOVER, FailoverSession, OnReconnect, RetryPolicy
from splitlm.shared.generation import (
    GenerationResult,
    GenerationSettings,
    SplitPipeline,
    StepOutput,
    TokenEvent,
    generate,
)
from tests.conftest import Daemon
from tests.reliability.vanishing_clients import open_request as open_request  # for the tests
from tests.shared.test_engine import PROMPT, _NoText

LONG = os.environ.get("SPLITLM_LONG", "") not in ("", "0")
"""``SPLITLM_LONG=1`` runs the long variants (more clients, messages, sessions, tokens)."""

HIDDEN = 64  # tiny_config's hidden size

FAST_RETRY = RetryPolicy(initial_delay_s=0.05, max_delay_s=0.5, deadline_s=90.0)
"""Backoff for tests: a tiny daemon restarts in seconds; the deadline only bounds a failure."""


Models = dict[str, Path]
"""The ``tiny_models`` fixture: family -> saved tiny model directory."""
Factory = Callable[..., Daemon]
"""The ``daemon_factory`` fixture."""


def scaled(ci: int, long: int) -> int:
    return long if LONG else ci


def wait_until(
    predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout:.0f} s")
        time.sleep(0.05)


def prompt_of(i: int, length: int = 12) -> list[int]:
    """A different prompt per ``i`` for the tiny models' 320-token vocabulary."""
    return [3 + (i * 37 + k * 11) % 310 for k in range(length)]


@dataclass
class Split:
    """An in-process split client of one daemon: the tiny model's bottom and top, loaded once."""

    client: TrunkClient
    parts: prepare.SplitParts
    eos_ids: list[int]

    def pipeline(
        self, retry: RetryPolicy = NO_FAILOVER, on_reconnect: OnReconnect | None = None
    ) -> SplitPipeline:
        return prepare.split_pipeline(self.parts, self.client, retry=retry, on_reconnect=on_reconnect)

    def close(self) -> None:
        self.client.close()


def connect(address: str, model_dir: Path) -> Split:
    from splitlm.shared.models import family_for, resolve

    client = TrunkClient(address)
    src = resolve(str(model_dir))
    tokenizer: Any = _NoText()  # random models have no tokenizer; the ids are all that matter
    model = prepare.LoadedModel(src, family_for(src.config), tokenizer, src.generation_eos())
    parts = prepare.split_parts(model, client.info(), torch.device("cpu"))
    return Split(client, parts, model.eos_ids)


@dataclass
class Recording:
    """A pipeline that keeps every step's logits, to compare runs bit for bit."""

    inner: SplitPipeline
    logits: list[torch.Tensor] = field(default_factory=list)

    @property
    def link_ratio(self) -> float:
        return self.inner.link_ratio

    def step(self, ids: Sequence[int], position: int, logits_for: int = 1) -> StepOutput:
        out = self.inner.step(ids, position, logits_for)
        self.logits.append(out.logits.clone())
        return out

    @property
    def bytes_sent(self) -> int:
        return self.inner.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self.inner.bytes_received

    def close(self) -> None:
        self.inner.close()


def run_ids(
    pipe: object,
    prompt: Sequence[int],
    n: int,
    on_token: Callable[[TokenEvent], None] | None = None,
    start_position: int = 0,
) -> GenerationResult:
    """Greedy ``n`` tokens (end tokens do not stop it: every run has the same length)."""
    return generate(
        pipe,
        _NoText(),
        list(prompt),
        GenerationSettings(max_new_tokens=n),
        [],  # type: ignore[arg-type]
        on_token=on_token,
        start_position=start_position,
    )


def sessions_open(address: str) -> int:
    client = TrunkClient(address, connect_timeout_s=10)
    try:
        return int(client.info().sessions_open)
    finally:
        client.close()


def plan_of(address: str) -> pb.Plan:
    client = TrunkClient(address, connect_timeout_s=10)
    try:
        return client.info().plan
    finally:
        client.close()


def rss(daemon: Daemon) -> int:
    return int(psutil.Process(daemon.proc.pid).memory_info().rss)


def hidden_tensor(t: int, width: int = HIDDEN, seed: int = 0) -> pb.Tensor:
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(t * width, generator=g, dtype=torch.float32).numpy().tobytes()
    return pb.Tensor(dtype=pb.FLOAT32, shape=[1, t, width], data=data)


def step_request(step_id: int, position: int, tensor: pb.Tensor) -> pb.SessionRequest:
    return pb.SessionRequest(step=pb.Step(step_id=step_id, position=position, hidden=tensor))


class Replica(Protocol):
    """A replica daemon as the replica tests hold it (``conftest.Daemon`` or ``OwnedDaemon``)."""

    address: str

    @property
    def proc(self) -> Any: ...


def sessions_per_replica(daemons: Sequence[Replica]) -> list[int]:
    return [sessions_open(d.address) for d in daemons]


@dataclass
class MovedReply:
    """A reply whose replica was killed -9 mid-reply, beside the same reply uninterrupted.

    Attributes:
        want, ref: the uninterrupted reply (on the first replica alone) and its steps' logits.
        got, pipe: the reply on the replica set, and its steps' logits.
        session: the interrupted reply's ``FailoverSession`` (its ``resumes``).
        victim: the index of the replica that held the session and was killed.
        survivor_sessions: sessions open on the other replicas at the reply's end (before its
            session closed): 1 when it moved to one of them.
    """

    want: GenerationResult
    ref: Recording
    got: GenerationResult
    pipe: Recording
    session: FailoverSession
    victim: int
    survivor_sessions: int

    def identical(self) -> bool:
        """Same tokens, and every step's logits equal bit for bit."""
        return self.got.token_ids == self.want.token_ids and len(self.pipe.logits) == len(self.ref.logits) and all(
            torch.equal(a, b) for a, b in zip(self.pipe.logits, self.ref.logits)
        )


def reply_with_its_replica_killed(
    replicas: Sequence[Replica], target: str, model: Path, n: int, kill_at: int,
    retry: RetryPolicy | None = None, on_reconnect: OnReconnect | None = None,
) -> MovedReply:
    """Generate ``n`` tokens through the replica set ``target``; when token ``kill_at`` arrives,
    kill -9 the replica holding the session (the one with a session open) and let the reply
    move. The reference reply runs first on ``replicas[0]`` alone, and is closed before."""
    ref_split = connect(replicas[0].address, model)
    ref = Recording(ref_split.pipeline())
    want = run_ids(ref, PROMPT, n)
    ref.close()
    ref_split.close()
    wait_until(lambda: sum(sessions_per_replica(replicas)) == 0, what="the reference session closed")
    split = connect(target, model)
    victims: list[int] = []

    def on_token(ev: TokenEvent) -> None:
        if ev.index == kill_at:
            victims.append(sessions_per_replica(replicas).index(1))
            replicas[victims[0]].proc.kill()
            replicas[victims[0]].proc.wait()

    pipe = Recording(split.pipeline(retry or RetryPolicy(), on_reconnect))
    try:
        got = run_ids(pipe, PROMPT, n, on_token=on_token)
        survivors = [d for i, d in enumerate(replicas) if i != victims[0]]
        survivor_sessions = sum(sessions_per_replica(survivors))
    finally:
        pipe.close()
        split.close()
    session = pipe.inner.session
    assert isinstance(session, FailoverSession), session
    return MovedReply(want, ref, got, pipe, session, victims[0], survivor_sessions)


__all__ = ["PROMPT", "Daemon", "TokenEvent"]
