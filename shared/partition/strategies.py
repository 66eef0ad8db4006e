"""The strategies of ``shared.partition``: cutting the trunk into stages (see the package's
docstring), checking that they fit, and saying why each cut fell where it did."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..config import PARTITION_STRATEGIES
from ..errors import UsageError
from .cost import ModelCost
from .devices import Device
from .text import fmt_bytes, fmt_flops

STRATEGIES = PARTITION_STRATEGIES
"""``--strategy`` values (spelled in the settings registry)."""
DEFAULT_STRATEGY = "memory"
"""What ``--strategy`` is when unset: devices run out of memory before they run out of time."""
MIXED_MEMORY_WEIGHT = 0.5
"""``mixed``: the weight of a layer's memory share; its compute share gets the rest."""

class NothingFits(UsageError):
    """A plan whose stages do not fit the memory of their devices (or of ``--client-memory``)."""


@dataclass(frozen=True)
class Stage:
    """One stage of a plan: layers ``[start, end)`` on one device.

    Attributes:
        role: ``bottom`` (the client's embedding and first layers), ``trunk`` or ``top``.
        device: the device name, or None when the plan names none (``--stages N``).
        reason: why the cut fell where it did, in words.
    """

    start: int
    end: int
    role: str
    device: str | None
    params: int
    weight_bytes: int
    kv_bytes_per_position: int
    kv_bytes: int
    flops_per_token: int
    reason: str = ""

    @property
    def memory_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [self.start, self.end], "device": self.device, "role": self.role,
            "params": self.params, "weight_bytes": self.weight_bytes,
            "kv_bytes_per_position": self.kv_bytes_per_position, "kv_bytes_at_max_context": self.kv_bytes,
            "memory_bytes": self.memory_bytes, "flops_per_token": self.flops_per_token, "reason": self.reason,
        }


@dataclass(frozen=True)
class Partition:
    """A plan: stages in layer order that tile ``[0, L)``; the bottom and top are the client's."""

    strategy: str
    cost: ModelCost
    stages: tuple[Stage, ...]
    notes: tuple[str, ...] = field(default=())

    @property
    def trunk(self) -> tuple[Stage, ...]:
        return tuple(s for s in self.stages if s.role == "trunk")

    @property
    def split(self) -> tuple[int, int]:
        """The client's cut: the trunk's first and last layer."""
        t = self.trunk
        return (t[0].start, t[-1].end)

    def to_dict(self) -> dict[str, Any]:
        c = self.cost
        return {
            "model": c.model, "model_type": c.model_type, "num_layers": c.num_layers, "strategy": self.strategy,
            "weights": c.precision, "max_context": c.max_context, "split": list(self.split),
            "stages": [s.to_dict() for s in self.stages], "notes": list(self.notes),
        }


def stage_of(cost: ModelCost, start: int, end: int, role: str, device: str | None, reason: str = "") -> Stage:
    """The costs of layers ``[start, end)`` with the ends the role holds."""
    ls = cost.layers[start:end]
    params = sum(x.params for x in ls)
    wb = sum(x.weight_bytes for x in ls)
    flops = sum(x.flops_per_token for x in ls)
    if role == "bottom":
        params, wb = params + cost.embed.params, wb + cost.embed.weight_bytes
    if role == "top":
        params, wb, flops = params + cost.head.params, wb + cost.head.weight_bytes, flops + cost.head.flops_per_token
    return Stage(start, end, role, device, params, wb, sum(x.kv_bytes_per_position for x in ls),
                 sum(x.kv_bytes for x in ls), flops, reason)


def layer_weights(cost: ModelCost, strategy: str, start: int, end: int) -> list[float]:
    """Each trunk layer's cost under ``strategy`` (``uniform``: 1 each)."""
    ls = cost.layers[start:end]
    if strategy == "memory":
        return [float(x.memory_bytes) for x in ls]
    if strategy == "compute":
        return [float(x.flops_per_token) for x in ls]
    if strategy == "mixed":
        mem = sum(x.memory_bytes for x in ls) or 1
        fl = sum(x.flops_per_token for x in ls) or 1
        return [MIXED_MEMORY_WEIGHT * x.memory_bytes / mem + (1 - MIXED_MEMORY_WEIGHT) * x.flops_per_token / fl for x in ls]
    return [1.0] * len(ls)


def balanced_cuts(costs: Sequence[float], shares: Sequence[float]) -> list[int]:
    """Cut ``costs`` into ``len(shares)`` contiguous non-empty groups minimising the largest
    ``group cost / share``; returns the group sizes. Exact (dynamic programming); ties go to the
    earliest cut.

    Raises:
        UsageError: more groups than items.
    """
    n, k = len(costs), len(shares)
    if k > n:
        raise UsageError(f"{k} stages need at least {k} trunk layers; the trunk has {n}")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = math.inf
    # best[j][i]: the smallest largest-stage cost of layers [0, i) in stages [0, j)
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    back = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for j in range(1, k + 1):
        for i in range(j, n - (k - j) + 1):
            for p in range(j - 1, i):
                v = max(best[j - 1][p], (prefix[i] - prefix[p]) / shares[j - 1])
                if v < best[j][i] - 1e-12 * max(1.0, abs(v)):
                    best[j][i], back[j][i] = v, p
    sizes, i = [], n
    for j in range(k, 0, -1):
        p = back[j][i]
        sizes.append(i - p)
        i = p
    return sizes[::-1]


def uniform_cuts(n: int, k: int) -> list[int]:
    """``n`` layers in ``k`` stages of as equal counts as can be, the first ones larger."""
    if k > n:
        raise UsageError(f"{k} stages need at least {k} trunk layers; the trunk has {n}")
    return [n // k + (1 if j < n % k else 0) for j in range(k)]


def parse_layers(text: str, num_layers: int) -> list[tuple[int, int]]:
    """``--layers 2:15,15:28``: the trunk stages of a custom plan, checked to tile a trunk
    range inside ``(0, L)`` (the bottom and the top keep at least one layer each).

    Raises:
        UsageError: malformed text, a gap or an overlap, or a range outside ``0 < a < b < L``.
    """
    ranges = []
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", item)
        if not m:
            raise UsageError(f"--layers must be trunk stages A:B separated by commas, e.g. 2:15,15:28; got {text!r}")
        ranges.append((int(m.group(1)), int(m.group(2))))
    for a, b in ranges:
        if a >= b:
            raise UsageError(f"--layers: stage {a}:{b} is empty (A must be below B)")
    for (a0, b0), (a1, b1) in zip(ranges, ranges[1:]):
        if b0 != a1:
            word = "gap" if b0 < a1 else "overlap"
            raise UsageError(f"--layers: a {word} between {a0}:{b0} and {a1}:{b1}: each stage must start where the one before ends")
    if not 0 < ranges[0][0] or not ranges[-1][1] < num_layers:
        raise UsageError(
            f"--layers {text}: the trunk must lie inside 1..{num_layers - 1} (the client keeps layer 0 and "
            f"layer {num_layers - 1} at least), got {ranges[0][0]}:{ranges[-1][1]}"
        )
    return ranges


def client_split(cost: ModelCost, client_memory: int | None) -> tuple[tuple[int, int], str]:
    """The client's cut ``(a, b)``: the family's default, or with ``client_memory`` as many of
    its layers as fit (bottom ``[0, a)`` and top ``[b, L)`` with their ends), and why.

    Raises:
        NothingFits: not even one layer at each end fits ``client_memory``.
    """
    a, b = cost.default_split
    n = cost.num_layers
    if client_memory is None:
        return (a, b), f"the family's default split {a}:{b}"

    def need(a: int, b: int) -> int:
        bottom, top = stage_of(cost, 0, a, "bottom", None), stage_of(cost, b, n, "top", None)
        return bottom.memory_bytes + top.memory_bytes

    while need(a, b) > client_memory and (a > 1 or b < n - 1):
        if a >= n - b and a > 1:
            a -= 1
        else:
            b += 1
    if need(a, b) > client_memory:
        raise NothingFits(
            f"the client's part does not fit --client-memory {fmt_bytes(client_memory)}: one layer at each end with "
            f"the embedding and head takes {fmt_bytes(need(a, b))} at --max-context {cost.max_context} "
            f"({fmt_bytes(need(a, b) - client_memory)} missing)"
        )
    if (a, b) == cost.default_split:
        return (a, b), f"the family's default split {a}:{b} fits --client-memory {fmt_bytes(client_memory)}"
    return (a, b), (f"--client-memory {fmt_bytes(client_memory)} holds {a} + {n - b} layers "
                    f"({fmt_bytes(need(a, b))}), not the default {cost.default_split[0]}:{cost.default_split[1]}")


def plan(
    cost: ModelCost,
    strategy: str = DEFAULT_STRATEGY,
    stages: int | None = None,
    devices: Sequence[Device] | None = None,
    client_memory: int | None = None,
    layers: str | None = None,
    trunk: tuple[int, int] | None = None,
) -> Partition:
    """A plan of ``cost``'s model: bottom, trunk stages, top.

    Args:
        strategy: one of ``STRATEGIES``.
        stages: trunk stages (the client's bottom and top come extra); default: one per device,
            or 1.
        devices: one per trunk stage, with their capacities (checked: ``NothingFits``).
        client_memory: bounds the client's bottom + top (``client_split``).
        layers: ``custom``'s trunk stages (``parse_layers``).
        trunk: the trunk range to cut (a daemon's ``--split A:B``); default: the client's split.

    Raises:
        UsageError: a bad combination (``custom`` without ``layers``, stages and devices that
            disagree, more stages than layers).
        NothingFits: a device (or the client) cannot hold its stage; the message says how much
            is missing.
    """
    if strategy not in STRATEGIES:
        raise UsageError(f"--strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    n = cost.num_layers
    notes: list[str] = []
    if strategy == "custom":
        if not layers:
            raise UsageError("--strategy custom needs --layers, the trunk stages, e.g. --layers 2:15,15:28")
        ranges = parse_layers(layers, n)
        split = (ranges[0][0], ranges[-1][1])
        if trunk is not None and split != trunk:
            raise UsageError(f"--layers {layers} covers {split[0]}:{split[1]}, not the trunk {trunk[0]}:{trunk[1]}")
        why_client = f"--layers starts the trunk at {split[0]} and ends it at {split[1]}"
    else:
        if layers:
            raise UsageError(f"--layers goes with --strategy custom, not {strategy}")
        if trunk is not None:
            split, why_client = trunk, f"the daemon's --split {trunk[0]}:{trunk[1]}"
        else:
            split, why_client = client_split(cost, client_memory)
        ranges = []
    k = len(ranges) if ranges else (len(devices) if devices else (stages or 1))
    if devices and stages and stages != len(devices):
        raise UsageError(f"--stages {stages} and --devices {','.join(d.name for d in devices)} ({len(devices)}) disagree: give one")
    if devices and len(devices) != k:
        raise UsageError(f"--layers gives {k} trunk stages but --devices names {len(devices)}: one device per stage")
    a, b = split
    if not ranges:
        if strategy == "uniform":
            sizes = uniform_cuts(b - a, k)
        else:
            caps = [d.capacity or 0 for d in devices] if devices else []
            shares = [c / max(caps) for c in caps] if caps and min(caps) > 0 else [1.0] * k
            sizes = balanced_cuts(layer_weights(cost, strategy, a, b), shares)
        ranges, at = [], a
        for s in sizes:
            ranges.append((at, at + s))
            at += s
    out = [stage_of(cost, 0, a, "bottom", "client", f"the client's: {why_client}")]
    trunk_stages = [stage_of(cost, s, e, "trunk", devices[j].name if devices else None) for j, (s, e) in enumerate(ranges)]
    out += _with_reasons(cost, strategy, trunk_stages, devices)
    out.append(stage_of(cost, b, n, "top", "client", f"the client's: {why_client}"))
    _check_fits(out, devices, client_memory)
    return Partition(strategy, cost, tuple(out), (*cost.notes, *notes))


def _with_reasons(cost: ModelCost, strategy: str, stages: list[Stage], devices: Sequence[Device] | None) -> list[Stage]:
    """Each trunk stage with the words saying why it ends where it does."""
    k = len(stages)
    total = sum(s.end - s.start for s in stages)
    if strategy == "custom":
        return [replace(s, reason="given by --layers") for s in stages]
    if strategy == "uniform":
        return [replace(s, reason=f"{total} layers / {k} stage(s): {s.end - s.start} here") for s in stages]
    key = {"memory": lambda s: s.memory_bytes, "compute": lambda s: s.flops_per_token}.get(strategy)
    out = []
    if key is not None:
        largest = max(key(s) for s in stages)
        unit = fmt_bytes if strategy == "memory" else fmt_flops
        what = f"weights + KV at {cost.max_context}" if strategy == "memory" else "FLOPs/token"
        for s in stages:
            tag = " (the largest: the cut minimises it)" if key(s) == largest and k > 1 else ""
            share = f" on {s.device}" if devices else ""
            out.append(replace(s, reason=f"{what} {unit(key(s))}{share}{tag}"))
        return out
    mem = sum(s.memory_bytes for s in stages) or 1
    fl = sum(s.flops_per_token for s in stages) or 1
    scores = [MIXED_MEMORY_WEIGHT * s.memory_bytes / mem + (1 - MIXED_MEMORY_WEIGHT) * s.flops_per_token / fl for s in stages]
    for s, sc in zip(stages, scores):
        tag = " (the largest: the cut minimises it)" if sc == max(scores) and k > 1 else ""
        out.append(replace(s, reason=f"{s.memory_bytes / mem:.0%} of trunk memory, {s.flops_per_token / fl:.0%} of "
                                     f"FLOPs: score {sc:.3f}{tag}"))
    return out


def _check_fits(stages: Sequence[Stage], devices: Sequence[Device] | None, client_memory: int | None) -> None:
    """Refuse a plan a device cannot hold: weights + one session's KV at --max-context."""
    problems = []
    if devices:
        for st, d in zip([s for s in stages if s.role == "trunk"], devices):
            if d.capacity is not None and st.memory_bytes > d.capacity:
                problems.append(
                    f"{d.name} holds {fmt_bytes(d.capacity)} but layers {st.start}:{st.end} need "
                    f"{fmt_bytes(st.memory_bytes)} ({fmt_bytes(st.memory_bytes - d.capacity)} missing)"
                )
    if client_memory is not None:
        need = sum(s.memory_bytes for s in stages if s.role != "trunk")
        if need > client_memory:
            problems.append(f"the client's part needs {fmt_bytes(need)} of --client-memory {fmt_bytes(client_memory)} "
                            f"({fmt_bytes(need - client_memory)} missing)")
    if problems:
        total_need = sum(s.memory_bytes for s in stages if s.role == "trunk")
        total_have = sum(d.capacity or 0 for d in devices) if devices else 0
        hint = (f"; all devices together hold {fmt_bytes(total_have)} for {fmt_bytes(total_need)} of trunk"
                if devices else "")
        raise NothingFits("nothing fits: " + "; ".join(problems) + hint +
                          " (a smaller --max-context, --weights int8/int4, or more devices)")
