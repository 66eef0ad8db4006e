"""Prometheus metrics over plain HTTP (``--metrics host:port``): the monitor's figures for scrapers.

The ``Monitor`` stream is for people and scripts watching now; a Prometheus server wants counters
it can rate over any window, pulled when it likes. So this endpoint reports totals since start
(steps, positions, trunk compute seconds, batches) and gauges read at scrape time (sessions,
queue, trunk cache, process memory and CPU, each GPU). Host-wide CPU and memory are left to
node_exporter.

The exposition is ``prometheus_client``'s (``pip install 'splitlm[daemon]'``): ``SnapshotCollector``
yields the metric families of one ``Snapshot``, built per scrape, so there is no registry and no
state between scrapes; the format follows the scraper's ``Accept`` header (Prometheus' text format
0.0.4 by default, OpenMetrics when asked). The HTTP side is a small HTTP/1.1 server on the daemon's
event loop (``asyncio.start_server``), bound to the configured address only: ``GET /metrics``,
nothing else. The snapshot's blocking reads (psutil, NVML) and the rendering run in worker
threads, so a scrape never holds the loop. What it exposes carries no text and no hidden states,
only load figures and the plan's names; it has no TLS or token, so bind it to loopback or a
network the scrapers share.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..shared.errors import UsageError
from ..shared.monitor import GpuSample
from .metrics import StepTotals

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

log = logging.getLogger(__name__)

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


GPU_GAUGES = (
    ("splitlm_gpu_utilization_percent", "GPU busy over NVML's sample period, 0-100.", "utilization_percent"),
    ("splitlm_gpu_memory_used_bytes", "GPU memory in use.", "memory_used_bytes"),
    ("splitlm_gpu_memory_total_bytes", "GPU memory in all.", "memory_total_bytes"),
    ("splitlm_gpu_temperature_celsius", "GPU temperature (absent when the board does not report it).",
     "temperature_c"),
    ("splitlm_gpu_power_watts", "GPU power draw (absent when the board does not report it).", "power_w"),
)
"""Per-GPU gauges (labels ``gpu``, ``name``): metric name, help, ``GpuSample`` attribute."""



def require_client() -> None:
    """Raises:
        UsageError: ``prometheus_client`` is not installed (``--metrics`` needs it).
    """
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise UsageError(
            "--metrics needs the prometheus_client package: pip install 'splitlm[daemon]'"
        ) from None


class SnapshotCollector:
    """The metric families of one ``Snapshot``, for ``prometheus_client``'s encoders.

    A ``prometheus_client`` collector is anything with ``collect()``; this one holds a snapshot
    taken for one scrape and is dropped after it, so the figures are read at scrape time and
    nothing is registered globally. Any thread (it only reads the frozen snapshot).
    """

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self.snapshot

        def gauge(name: str, help: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, help, value=value)

        def counter(name: str, help: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, help, value=value)  # "_total" is the sample's suffix

        info = GaugeMetricFamily("splitlm_trunk_info", "The trunk this daemon serves (value always 1).",
                                 labels=list(s.plan))
        info.add_metric(list(s.plan.values()), 1)
        yield info
        yield gauge("splitlm_up", "1 while serving, 0 once shutting down.", 0 if s.stopping else 1)
        yield gauge("splitlm_sessions_open", "Sessions holding a trunk cache.", s.sessions_open)
        yield gauge("splitlm_sessions_max", "The session cap (--max-sessions).", s.max_sessions)
        yield gauge("splitlm_steps_queued", "Steps waiting for the compute thread.", s.steps_queued)
        yield gauge("splitlm_trunk_cache_bytes",
                    "Trunk KV cache buffers allocated by all sessions (what --max-cache-bytes caps).",
                    s.cache_bytes)
        yield gauge("splitlm_trunk_cache_used_bytes", "Of which positions in use.", s.cache_used_bytes)
        if s.cache_budget_bytes is not None:
            yield gauge("splitlm_trunk_cache_budget_bytes", "The trunk cache cap (--max-cache-bytes).",
                        s.cache_budget_bytes)
        yield counter("splitlm_steps_total", "Trunk steps completed.", s.totals.steps)
        yield counter("splitlm_positions_total", "Positions the trunk computed (a 20-token prefill counts 20).",
                      s.totals.positions)
        yield counter("splitlm_trunk_compute_seconds_total", "Time the trunk spent computing steps.",
                      s.totals.compute_s)
        if s.batches is not None and s.batched_steps is not None:
            yield counter("splitlm_batches_total", "Batched forwards of 2 or more sessions' steps (--batch).",
                          s.batches)
            yield counter("splitlm_batched_steps_total", "Steps that ran in those batches.", s.batched_steps)
        yield gauge("process_resident_memory_bytes", "Resident memory of the daemon.", s.rss_bytes)
        yield counter("process_cpu_seconds_total", "User and system CPU time of the daemon.", s.cpu_seconds)
        gpus = GaugeMetricFamily("splitlm_gpus", "NVIDIA GPUs NVML reads; the reason label says why when 0.",
                                 labels=["reason"] if s.gpu_status else [])
        gpus.add_metric([s.gpu_status] if s.gpu_status else [], len(s.gpus))
        yield gpus
        for name, help, attr in GPU_GAUGES:
            family = GaugeMetricFamily(name, help, labels=["gpu", "name"])
            for g in s.gpus:
                if (v := getattr(g, attr)) is not None:
                    family.add_metric([str(g.index), g.name], float(v))
            if family.samples:
                yield family


def encode(snapshot: Snapshot, accept: str = "") -> tuple[bytes, str]:
    """The exposition of one snapshot in the format ``accept`` (an HTTP ``Accept`` header) asks
    for, and its content type: Prometheus' text format 0.0.4 unless OpenMetrics (or text 1.0.0)
    is asked for. Any thread."""
    from prometheus_client.exposition import choose_encoder

    encoder, content_type = choose_encoder(accept)
    return encoder(SnapshotCollector(snapshot)), content_type


def render(s: Snapshot) -> str:
    """The text format (0.0.4) of one snapshot."""
    return encode(s)[0].decode()


async def _respond(
    writer: asyncio.StreamWriter, status: str, body: str | bytes, content_type: str = "text/plain"
) -> None:
    data = body.encode() if isinstance(body, str) else body
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
            UsageError: ``prometheus_client`` is not installed.
            OSError: the address cannot be bound (in use, not permitted).
        """
        require_client()
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
            except (asyncio.IncompleteReadError, asyncio.TimeoutError):  # not TimeoutError on 3.10
                return
            request, *headers = head.decode("latin-1").split("\r\n")
            method, _, rest = request.partition(" ")
            path = rest.split(" ", 1)[0].split("?", 1)[0]
            if path != "/metrics":
                await _respond(writer, "404 Not Found", "splitlm-trunkd serves GET /metrics only\n")
            elif method != "GET":
                await _respond(writer, "405 Method Not Allowed", "GET /metrics\n")
            else:
                accept = next((v.strip() for k, _, v in (h.partition(":") for h in headers)
                               if k.strip().lower() == "accept"), "")
                snapshot = await self.collect()
                body, content_type = await asyncio.to_thread(encode, snapshot, accept)
                self.scrapes += 1
                await _respond(writer, "200 OK", body, content_type)
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
