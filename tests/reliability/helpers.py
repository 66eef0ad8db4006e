"""What the failure tests share: sizes (CI or long), waiting, in-process split clients of a
daemon subprocess, and the daemon's resident memory."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

from splitlm.protos import trunk_pb2 as pb
from splitlm.shared import prepare
from splitlm.shared.client import TrunkClient
from splitlm.shared.failover import NO_FAILOVER, OnReconnect, RetryPolicy
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


__all__ = ["PROMPT", "Daemon", "TokenEvent"]
