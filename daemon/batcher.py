"""Cross-session batching (``--batch``): the decode steps of concurrent sessions run as one batch.

A trunk decode step on a CPU is bound by reading the weights, so one forward over 8 sessions'
positions costs little more than over 1. Steps wait in one list on the event loop; whenever the
compute thread is free, one job takes every step waiting (after ``window_s``, 0 by default: no
added latency at low load) and runs it: the one-position steps together through
``Part.forward_rows``, the others (prefills, a lone step) alone as without batching.

Each step keeps its own checks and rollback (``Part.begin_step``), errors and timing: a step that
does not fit fails alone before the batch runs, and if the batch itself fails, its rows are rolled
back and each runs alone, so a bad step never takes its batch-mates down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch

from ..shared.cache import PartCache
from ..shared.models import Part
from .metrics import QueueGauge

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class BatchPolicy:
    """How the daemon batches.

    Attributes:
        window_s: when the compute thread frees up and fewer steps wait than the last batch
            ran, wait up to this long for the others (0: never wait). A lone session never
            waits: its last batch was itself.
        max_rows: at most this many steps in one batch.
    """

    window_s: float = 0.0
    max_rows: int = 64


@dataclass(frozen=True)
class BatchStats:
    """Batches run so far: ``batches`` forwards of 2 rows or more, ``rows`` steps in them."""

    batches: int = 0
    rows: int = 0


@dataclass
class _Waiting(Generic[T]):
    cache: PartCache
    h: torch.Tensor
    position: int
    max_context: int | None
    encode: Callable[[torch.Tensor], T]
    future: asyncio.Future[tuple[T, int]] = field(repr=False)


Outcome = tuple[object, int] | BaseException


class StepBatcher:
    """Runs steps of many sessions on the one compute executor, batching decode steps.

    ``submit`` is called on the event loop only; the compute runs on ``executor`` (one thread).
    """

    def __init__(self, part: Part, executor: Executor, policy: BatchPolicy, queue: QueueGauge) -> None:
        # int8 parts batch too: their weights are int8, their activations float32 (weight-only,
        # see shared.models.precision), so a row depends on its batch-mates only by float
        # rounding, as with float32 weights (tests/daemon/test_batcher.py measures both)
        self.part = part
        self.executor = executor
        self.policy = policy
        self.queue = queue
        self.stats = BatchStats()
        self._waiting: list[_Waiting[object]] = []
        self._drain: asyncio.Task[None] | None = None
        self._arrived = asyncio.Event()
        self._last_rows = 0

    async def submit(
        self,
        cache: PartCache,
        h: torch.Tensor,
        position: int,
        max_context: int | None,
        encode: Callable[[torch.Tensor], T],
    ) -> tuple[T, int]:
        """One step of one session: its output through ``encode`` and its compute time (ns).

        Raises:
            whatever ``Part.forward`` raises for this step (InvalidStep, PositionError...).
        """
        loop = asyncio.get_running_loop()
        item = _Waiting(cache, h, position, max_context, encode, loop.create_future())
        self._waiting.append(item)
        self._arrived.set()
        self.queue.add(1)
        if self._drain is None or self._drain.done():
            self._drain = loop.create_task(self._run_waiting())
        return await item.future

    async def _run_waiting(self) -> None:
        while self._waiting:
            await self._gather()
            take = self._waiting[: self.policy.max_rows]
            self._last_rows = len(take)
            del self._waiting[: len(take)]
            self.queue.add(-len(take))
            take = [w for w in take if not w.future.done()]  # a session gone while waiting
            if not take:
                continue
            try:
                # still counted as waiting until the compute thread starts the batch: a sliced
                # prefill (daemon.schedule) yields to it only if it sees it waiting
                outcomes, rows = await self.queue.run(self.executor, self._compute, take, weight=len(take))
            except BaseException as e:  # noqa: BLE001 - cancelled loop or a bug: each step learns
                for w in take:
                    if not w.future.done():
                        w.future.set_exception(e)
                raise
            if rows > 1:
                self.stats = BatchStats(self.stats.batches + 1, self.stats.rows + rows)
            for w, out in zip(take, outcomes):
                if w.future.done():
                    continue
                if isinstance(out, BaseException):
                    w.future.set_exception(out)
                else:
                    w.future.set_result(out)

    async def _gather(self) -> None:
        """Wait up to ``window_s`` while fewer steps wait than the last batch ran: the sessions
        that were in it send their next step about now, one round trip after their reply."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.policy.window_s
        while len(self._waiting) < min(self._last_rows, self.policy.max_rows):
            left = deadline - loop.time()
            if left <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except asyncio.TimeoutError:  # not the builtin on Python 3.10 (an alias from 3.11)
                return

    def _compute(self, take: list[_Waiting[object]]) -> tuple[list[Outcome], int]:
        """On the executor thread: the outcome of each step, and how many ran as one batch."""
        outcomes: list[Outcome | None] = [None] * len(take)
        rows: list[int] = []
        for i, w in enumerate(take):
            if w.h.shape[1] != 1 or len(take) == 1:
                outcomes[i] = self._solo(w)
                continue
            try:
                self.part.begin_step(w.h, w.position, w.cache, w.max_context)
                rows.append(i)
            except Exception as e:  # noqa: BLE001 - this step fails alone
                outcomes[i] = e
        batched = 0
        if len(rows) == 1:
            outcomes[rows[0]] = self._solo(take[rows[0]])
        elif rows:
            outs, batched = self._rows([take[i] for i in rows])
            for i, out in zip(rows, outs):
                outcomes[i] = out
        return [o if o is not None else RuntimeError("step not run") for o in outcomes], batched

    def _solo(self, w: _Waiting[object]) -> Outcome:
        t0 = time.perf_counter_ns()
        try:
            out = self.part.forward(w.h, w.position, w.cache, max_context=w.max_context)
            return w.encode(out), time.perf_counter_ns() - t0
        except Exception as e:  # noqa: BLE001 - returned to its own step
            return e

    def _rows(self, ws: list[_Waiting[object]]) -> tuple[list[Outcome], int]:
        """The outcome of each step, and how many ran as one batch (0 if the batch failed)."""
        t0 = time.perf_counter_ns()
        try:
            outs = self.part.forward_rows([w.h for w in ws], [w.position for w in ws], [w.cache for w in ws])
        except Exception:
            log.exception("a batch of %d steps failed; rolling each back and running it alone", len(ws))
            for w in ws:
                discard_beyond(w.cache, w.position)
            return [self._solo(w) for w in ws], 0
        ns = time.perf_counter_ns() - t0
        results: list[Outcome] = []
        for w, out in zip(ws, outs):
            try:
                results.append((w.encode(out), ns))
            except Exception as e:  # noqa: BLE001 - returned to its own step
                results.append(e)
        return results, len(ws)


def discard_beyond(cache: PartCache, length: int) -> None:
    """Drop whatever a failed batch appended to ``cache`` past ``length`` (its length is unchanged:
    ``forward_rows`` sets it only on success)."""
    for i in range(cache.start, cache.end):
        layer = cache.layers[i]
        truncate = getattr(layer, "truncate", None)
        if truncate is not None:
            truncate(length)
    cache.length = min(cache.length, length)
