"""The daemon's monitor samples as both sides see them: frozen dataclasses, protobuf in and out.

The daemon builds a ``MonitorSample`` per interval and sends ``to_pb()``; clients (``splitlm
monitor``, the TUI's server panel) get ``from_pb()`` and print ``to_dict()`` or ``format_line()``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields
from typing import Any

from ..protos import trunk_pb2 as pb
from .errors import UsageError

DEFAULT_INTERVAL_S = 1.0
"""What an unset (0) ``MonitorRequest.interval_s`` means."""
MIN_INTERVAL_S = 0.25
"""Faster than this, sampling itself (NVML, /proc) would start to show in the daemon's CPU use."""
MAX_INTERVAL_S = 10.0
"""Slower than this, tokens/s and p95 over one interval stop describing "now"."""


def check_interval(interval_s: float) -> float:
    """The sampling interval a client asked for, 0 meaning the default, rounded to milliseconds.

    Rounding lets ``0.3`` sent as a 32-bit float (0.30000001...) share a sampler with ``0.3``.

    Raises:
        UsageError: outside ``MIN_INTERVAL_S``-``MAX_INTERVAL_S`` (or not a number).
    """
    if interval_s == 0:
        return DEFAULT_INTERVAL_S
    if not (MIN_INTERVAL_S <= interval_s <= MAX_INTERVAL_S):  # also refuses NaN
        raise UsageError(
            f"monitor interval must be {MIN_INTERVAL_S:g}-{MAX_INTERVAL_S:g} s "
            f"(0 for the default {DEFAULT_INTERVAL_S:g} s), got {interval_s:g}"
        )
    return round(float(interval_s), 3)


@dataclass(frozen=True)
class GpuSample:
    """One NVIDIA GPU as NVML reports it.

    Attributes:
        index: NVML device index.
        utilization_percent: busy time of the GPU over NVML's own sample period, 0-100.
        temperature_c, power_w: None when the GPU does not report them.
    """

    index: int
    name: str
    utilization_percent: float
    memory_used_bytes: int
    memory_total_bytes: int
    temperature_c: float | None
    power_w: float | None

    @classmethod
    def from_pb(cls, m: pb.GpuSample) -> GpuSample:
        return cls(
            index=m.index,
            name=m.name,
            utilization_percent=m.utilization_percent,
            memory_used_bytes=m.memory_used_bytes,
            memory_total_bytes=m.memory_total_bytes,
            temperature_c=m.temperature_c if m.HasField("temperature_c") else None,
            power_w=m.power_w if m.HasField("power_w") else None,
        )

    def to_pb(self) -> pb.GpuSample:
        m = pb.GpuSample(
            index=self.index,
            name=self.name,
            utilization_percent=self.utilization_percent,
            memory_used_bytes=self.memory_used_bytes,
            memory_total_bytes=self.memory_total_bytes,
        )
        if self.temperature_c is not None:
            m.temperature_c = self.temperature_c
        if self.power_w is not None:
            m.power_w = self.power_w
        return m

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class MonitorSample:
    """What the daemon's host and trunk did over one interval.

    Attributes:
        time: unix seconds when sampled (daemon clock); subscribers at one interval share samples,
            so they see the same values.
        interval_s: the sampling interval.
        cpu_percent: host CPU busy over the interval, all cores together, 0-100.
        load_1m, load_5m, load_15m: host load averages.
        mem_used_bytes: host memory in use (total minus available).
        daemon_rss_bytes: resident memory of the daemon process.
        gpus: NVIDIA GPUs; empty when there are none or NVML cannot run.
        gpu_status: "" when NVML found GPUs, else the reason (``"no NVIDIA GPU: ..."``).
        sessions_open: sessions holding a trunk cache at sampling time.
        steps_queued: steps waiting for the compute executor at sampling time.
        steps: steps completed in the interval.
        tokens_per_s: positions computed by the trunk per second over the interval.
        step_p50_ms, step_p95_ms: trunk compute time per step over the interval; 0 without steps.
        trunk_cache_bytes: KV cache buffers allocated by all sessions (what ``--max-cache-bytes``
            caps: slack included).
        trunk_cache_used_bytes: of which positions in use.
        trunk_cache_budget_bytes: the daemon's cap; 0 when it has none.
    """

    time: float
    interval_s: float
    cpu_percent: float
    load_1m: float
    load_5m: float
    load_15m: float
    mem_used_bytes: int
    mem_total_bytes: int
    daemon_rss_bytes: int
    gpus: tuple[GpuSample, ...]
    gpu_status: str
    sessions_open: int
    steps_queued: int
    steps: int
    tokens_per_s: float
    step_p50_ms: float
    step_p95_ms: float
    trunk_cache_bytes: int
    trunk_cache_used_bytes: int = 0
    trunk_cache_budget_bytes: int = 0

    @classmethod
    def from_pb(cls, m: pb.MonitorSample) -> MonitorSample:
        values: dict[str, Any] = {
            f.name: getattr(m, f.name) for f in fields(cls) if f.name != "gpus"
        }
        return cls(gpus=tuple(GpuSample.from_pb(g) for g in m.gpus), **values)

    def to_pb(self) -> pb.MonitorSample:
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "gpus"}
        return pb.MonitorSample(gpus=[g.to_pb() for g in self.gpus], **values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: keys are the field names, ``gpus`` a list of dicts."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["gpus"] = [g.to_dict() for g in self.gpus]
        return d


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f}"


def _gpu_text(g: GpuSample) -> str:
    parts = [
        f"gpu{g.index} {g.utilization_percent:.0f}%",
        f"{_gib(g.memory_used_bytes)}/{_gib(g.memory_total_bytes)} GiB",
    ]
    if g.temperature_c is not None:
        parts.append(f"{g.temperature_c:.0f}°C")
    if g.power_w is not None:
        parts.append(f"{g.power_w:.0f} W")
    return " ".join(parts)


def format_line(s: MonitorSample) -> str:
    """One human line per sample, for ``splitlm monitor`` (local time of the daemon's clock)."""
    gpus = ", ".join(_gpu_text(g) for g in s.gpus)
    gpu = "; ".join(x for x in (gpus, s.gpu_status) if x)
    p = (
        f"p50 {s.step_p50_ms:.1f} ms p95 {s.step_p95_ms:.1f} ms"
        if s.steps else "p50 - p95 -"
    )
    return (
        f"{time.strftime('%H:%M:%S', time.localtime(s.time))}"
        f"  cpu {s.cpu_percent:5.1f}%  load {s.load_1m:.2f}"
        f"  mem {_gib(s.mem_used_bytes)}/{_gib(s.mem_total_bytes)} GiB"
        f"  rss {s.daemon_rss_bytes / 2**20:.0f} MiB"
        f"  | {gpu}"
        f"  | sessions {s.sessions_open}  queued {s.steps_queued}  steps {s.steps}"
        f"  {s.tokens_per_s:.1f} tok/s  {p}"
        f"  cache {s.trunk_cache_bytes / 2**20:.1f}"
        + (f"/{s.trunk_cache_budget_bytes / 2**20:.1f}" if s.trunk_cache_budget_bytes else "")
        + " MiB"
    )

