"""Prometheus metrics over plain HTTP (``--metrics host:port``): the monitor's figures for scrapers.

The ``Monitor`` stream is for people and scripts watching now; a Prometheus server wants counters
it can rate over any window, pulled when it likes. So this endpoint reports totals since start
(steps, positions, trunk compute seconds, batches) and gauges read at scrape time (sessions,
queue, trunk cache, process memory and CPU, each GPU), in the text exposition format 0.0.4.
Host-wide CPU and memory are left to node_exporter.

A small HTTP/1.1 server on the daemon's event loop (``asyncio.start_server``): ``GET /metrics``,
nothing else. The blocking reads (psutil, NVML) run in a worker thread. What it exposes carries no
text and no hidden states, only load figures and the plan's names; it has no TLS or token, so
bind it to loopback or a network the scrapers share.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from ..shared.monitor import GpuSample
from .metrics import StepTotals

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_REQUEST_BYTES = 8192
"""A request line and headers longer than this get 431: scrapers send a few hundred bytes."""
READ_TIMEOUT_S = 10.0
"""A connection that has not sent its request within this is closed (a stalled peer holds nothing)."""


@dataclass(frozen=True)
class Snapshot:
    """The figures of one scrape (built on the loop, host parts from a worker thread).

    Attributes:
        plan: labels of ``splitlm_trunk_info`` (model, layers, device, weights, fingerprint).
        cache_bytes: storage all sessions' cache buffers allocate (what the cap counts).
        cache_used_bytes: of which positions in use.
        cache_budget_bytes: the trunk cache cap, None when there is none.
        batches, batched_steps: None when batching is off.
        gpu_status: "" when NVML read every GPU, else why some or all are missing.
    """

    plan: dict[str, str]
    sessions_open: int
    max_sessions: int
    steps_queued: int
    cache_bytes: int
    cache_budget_bytes: int | None
    totals: StepTotals
    rss_bytes: int
    cpu_seconds: float
    gpus: tuple[GpuSample, ...] = ()
    gpu_status: str = ""
    batches: int | None = None
    batched_steps: int | None = None
    stopping: bool = False
    cache_used_bytes: int = 0


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _number(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(int(v)) if float(v).is_integer() and abs(v) < 2**53 else repr(float(v))


@dataclass
class _Family:
    name: str
    kind: str  # counter or gauge
    help: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)

    def lines(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} {self.kind}"
        for labels, value in self.samples:
            yield f"{self.name}{_labels(labels)} {_number(value)}"


def render(s: Snapshot) -> str:
    """The exposition text of one snapshot."""
    families: list[_Family] = []

    def add(name: str, kind: str, help: str, *samples: tuple[dict[str, str], float]) -> None:
        families.append(_Family(name, kind, help, list(samples)))

    add("splitlm_trunk_info", "gauge", "The trunk this daemon serves (value always 1).", (s.plan, 1))
    add("splitlm_up", "gauge", "1 while serving, 0 once shutting down.", ({}, 0 if s.stopping else 1))
    add("splitlm_sessions_open", "gauge", "Sessions holding a trunk cache.", ({}, s.sessions_open))
    add("splitlm_sessions_max", "gauge", "The session cap (--max-sessions).", ({}, s.max_sessions))
    add("splitlm_steps_queued", "gauge", "Steps waiting for the compute thread.", ({}, s.steps_queued))
    add("splitlm_trunk_cache_bytes", "gauge",
        "Trunk KV cache buffers allocated by all sessions (what --max-cache-bytes caps).", ({}, s.cache_bytes))
    add("splitlm_trunk_cache_used_bytes", "gauge", "Of which positions in use.", ({}, s.cache_used_bytes))
    if s.cache_budget_bytes is not None:
        add("splitlm_trunk_cache_budget_bytes", "gauge", "The trunk cache cap (--max-cache-bytes).",
            ({}, s.cache_budget_bytes))
    add("splitlm_steps_total", "counter", "Trunk steps completed.", ({}, s.totals.steps))
    add("splitlm_positions_total", "counter", "Positions the trunk computed (a 20-token prefill counts 20).",
        ({}, s.totals.positions))
    add("splitlm_trunk_compute_seconds_total", "counter", "Time the trunk spent computing steps.",
        ({}, s.totals.compute_s))
    if s.batches is not None and s.batched_steps is not None:
        add("splitlm_batches_total", "counter", "Batched forwards of 2 or more sessions' steps (--batch).",
            ({}, s.batches))
        add("splitlm_batched_steps_total", "counter", "Steps that ran in those batches.", ({}, s.batched_steps))
    add("process_resident_memory_bytes", "gauge", "Resident memory of the daemon.", ({}, s.rss_bytes))
    add("process_cpu_seconds_total", "counter", "User and system CPU time of the daemon.", ({}, s.cpu_seconds))
    add("splitlm_gpus", "gauge", "NVIDIA GPUs NVML reads; the reason label says why when 0.",
        ({"reason": s.gpu_status} if s.gpu_status else {}, len(s.gpus)))
    gpu = [
        ("splitlm_gpu_utilization_percent", "GPU busy over NVML's sample period, 0-100.", "utilization_percent"),
        ("splitlm_gpu_memory_used_bytes", "GPU memory in use.", "memory_used_bytes"),
        ("splitlm_gpu_memory_total_bytes", "GPU memory in all.", "memory_total_bytes"),
        ("splitlm_gpu_temperature_celsius", "GPU temperature (absent when the board does not report it).",
         "temperature_c"),
        ("splitlm_gpu_power_watts", "GPU power draw (absent when the board does not report it).", "power_w"),
    ]
    for name, help, attr in gpu:
        samples = [({"gpu": str(g.index), "name": g.name}, float(v))
                   for g in s.gpus if (v := getattr(g, attr)) is not None]
        if samples:
            add(name, "gauge", help, *samples)
    return "\n".join(line for f in families for line in f.lines()) + "\n"


async def _respond(writer: asyncio.StreamWriter, status: str, body: str, content_type: str = "text/plain") -> None:
    data = body.encode()
    writer.write(
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(data)}\r\n"
        "Connection: close\r\n\r\n".encode() + data
    )
    await writer.drain()


class MetricsServer:
    """``GET /metrics`` on ``host:port``. Loop only.

    Args:
        address: ``host:port`` (``[::1]:port`` for IPv6).
        collect: builds the snapshot of one scrape; a coroutine, run on the loop.
    """

    def __init__(self, address: str, collect: Callable[[], Awaitable[Snapshot]]) -> None:
        host, _, port = address.rpartition(":")
        self.address = address
        self.host = host.strip("[]")
        self.port = int(port)
        self.collect = collect
        self.scrapes = 0
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        """Bind and listen.

        Raises:
            OSError: the address cannot be bound (in use, not permitted).
        """
        self._server = await asyncio.start_server(self._handle, self.host, self.port, limit=MAX_REQUEST_BYTES)
        log.info("Prometheus metrics on http://%s/metrics (plain HTTP, no token)", self.address)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
            except (asyncio.LimitOverrunError, ValueError):
                await _respond(writer, "431 Request Header Fields Too Large", "request too large\n")
                return
            except (asyncio.IncompleteReadError, TimeoutError):
                return
            method, _, rest = head.decode("latin-1").partition(" ")
            path = rest.split(" ", 1)[0].split("?", 1)[0]
            if path != "/metrics":
                await _respond(writer, "404 Not Found", "splitlm-trunkd serves GET /metrics only\n")
            elif method != "GET":
                await _respond(writer, "405 Method Not Allowed", "GET /metrics\n")
            else:
                snapshot = await self.collect()
                self.scrapes += 1
                await _respond(writer, "200 OK", render(snapshot), CONTENT_TYPE)
        except ConnectionError:
            pass
        except Exception:  # a bad scrape must never take the daemon down
            log.exception("metrics scrape failed")
            try:
                await _respond(writer, "500 Internal Server Error", "metrics collection failed; see the daemon log\n")
            except ConnectionError:
                pass
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except ConnectionError:
                pass
