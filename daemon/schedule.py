"""Long steps in slices of layers, so other sessions' decode steps run between the slices.

A 1024-position prefill through SmolLM2's 26 trunk layers (split 2:28) holds the one compute
thread for about a second; without slicing, every other session's decode step queues behind it. Here a step whose
work (positions x trunk layers) exceeds ``--prefill-slice`` runs a few layers per executor job:
the compute executor is one FIFO thread, so the decode steps (or the decode batch) that arrived
during a slice run before the next slice, and a decode step waits for at most one slice.

Why slices of layers and not chunks of positions: a prefill cut into position chunks is *not*
bit-identical to one big prefill (other matmul shapes, attention over a different split of
keys), and the exactness this project promises is "split == full model, greedy, token for
token", where the full model prefills the prompt in one piece; the client's failover replay also
keeps its steps as they were for that reason (DESIGN.md "Failover"). Cutting between layers
changes nothing a layer computes: each layer sees the same input tensor, the same mask and rotary
values (recomputed per slice from the same positions and from caches not yet grown by this
step), and appends the same keys and values, so the sliced step's output equals the whole step's
bit for bit (tests/daemon/test_schedule.py), whatever the load. So the cut may depend on the load:
a slice ends the executor job only when another step waits, and a prefill alone runs in one job.
The cost under load: a hand-off per cut (~0.5 ms: BENCHMARKS.md's step timeline) and a prefill
that finishes later when decode steps cut in (they are served first: that is the point).

Threads: ``SlicedStep.advance`` runs on the compute executor; ``run_sliced`` on the event loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Executor
from contextlib import AbstractContextManager, nullcontext
from typing import TypeVar

import torch

from ..shared.cache import PartCache
from ..shared.models import Part
from .metrics import QueueGauge

T = TypeVar("T")

DEFAULT_PREFILL_SLICE = 1024
"""Positions x layers per slice (``--prefill-slice``), chosen by measurement on SmolLM2 2:28
(BENCHMARKS.md "Under load"): a position-layer of a prefill costs ~37 us there on a quiet machine,
so a slice of 1024 is ~40 ms (one layer of a 1024-token prefill), about one decode step: a decode
step waits at most about its own length. Against 4096 (4 layers a slice) it cut decode p50 beside a
1024-token prefill 3-5x for a prefill ~10-35 % slower. A slice ends its executor job only when
another step waits (``run_sliced``), so a prefill alone costs nothing more."""


def layers_per_slice(positions: int, layers: int, work: int) -> int:
    """Layers one slice of a step over ``positions`` runs: as many as keep positions x layers
    within ``work``, at least one; all of them when ``work`` is 0 (slicing off)."""
    if work <= 0:
        return layers
    return max(1, min(layers, work // max(1, positions)))


class SlicedStep:
    """One step of a trunk part over ``[position, position + t)``, a slice of layers at a time.

    ``advance`` runs the next slice and returns None, or, after the last slice, what
    ``Part.forward`` returns for the step (bit for bit). Executor thread only, one call at a time.

    Args:
        part: a trunk part (no embedding, no head: the daemon's).
        per_slice: layers per slice (``layers_per_slice``).
    """

    def __init__(
        self, part: Part, h: torch.Tensor, position: int, cache: PartCache, max_context: int | None, per_slice: int
    ) -> None:
        if part.spec.embed or part.spec.head:
            raise ValueError("only a trunk part runs in slices")
        self.part = part
        self.h = h
        self.position = position
        self.cache = cache
        self.max_context = max_context
        self.per_slice = max(1, per_slice)
        self.start, self.end = cache.start, cache.end
        self._next = self.start
        self._begun = False

    @property
    def slices(self) -> int:
        return -(-(self.end - self.start) // self.per_slice)

    @torch.inference_mode()
    def advance(self) -> torch.Tensor | None:
        """Run the next slice; the step's output after the last, else None.

        Raises:
            InvalidStep, PositionError, ContextExhausted: from the first slice, before anything
            changed (``Part.begin_step``).
        """
        part, t = self.part, int(self.h.shape[1])
        if not self._begun:
            part.begin_step(self.h, self.position, self.cache, self.max_context)
            self._begun = True
        a, b = self._next, min(self.end, self._next + self.per_slice)
        self.h = part.run_span(self.h, self.position, self.cache, a, b)  # (1, t, H), on the last layer's device
        self._next = b
        if b < self.end:
            return None
        self.cache.length = self.position + t
        return self.h


async def run_sliced(
    executor: Executor,
    queue: QueueGauge,
    step: SlicedStep,
    encode: Callable[[torch.Tensor], T],
    compute: AbstractContextManager[object] | None = None,
) -> tuple[T, int]:
    """Run ``step`` to its end; its output through ``encode`` (on the executor, with the last
    slice) and the compute time of all its slices in ns. Loop only.

    After each slice the compute thread looks at ``queue``: while no other step waits it goes on
    with the next slice in the same job (a prefill alone pays no hand-off); when one waits, the job
    ends and the next slice is queued behind it, so decode steps (and ``--batch``'s decode batches)
    go first. Slices by layers change no bit, so this load-dependent cut is free of exactness cost.
    Each job holds ``compute`` (the daemon's compute lock): a decode step the loop runs itself
    (``TrunkSteps``) never computes beside a slice.
    """

    def run_until_someone_waits() -> tuple[list[T], int]:
        with compute or nullcontext():
            return _slices_until_someone_waits()

    def _slices_until_someone_waits() -> tuple[list[T], int]:
        t0 = time.perf_counter_ns()
        while True:
            out = step.advance()
            if out is not None:
                return [encode(out)], time.perf_counter_ns() - t0
            if len(queue):
                return [], time.perf_counter_ns() - t0

    total = 0
    for _ in range(step.slices):
        done, ns = await queue.run(executor, run_until_someone_waits)
        total += ns
        if done:
            return done[0], total
    raise RuntimeError("a sliced step ran all its slices without an output")  # a bug
