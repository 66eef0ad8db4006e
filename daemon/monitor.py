"""The monitor sampler: host CPU/memory/GPUs and trunk figures, sampled once per interval and
streamed to any number of subscribers.

Design: one sampler task per distinct interval, shared by every subscriber at that interval.
Subscribers at 1 s share one sample per second (they see the same ``time``); a subscriber at 0.5 s
gets its own sampler. Every sample then describes exactly its own interval (CPU busy time and
trunk steps are deltas over it), which a base tick at the smallest interval could not give the
slower subscribers without re-aggregating. A sampler starts with its first subscriber and is
cancelled when its last one leaves, so a subscriber that disconnects costs nothing. A slow
subscriber never holds a sampler up: its queue keeps the newest few samples and drops the oldest.

psutil and NVML calls run in a worker thread (``asyncio.to_thread``); NVML (``pynvml`` from
nvidia-ml-py, the ``daemon`` extra) is imported lazily, and when it is missing or finds no driver
the samples carry an empty GPU list and the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc
import psutil

from ..shared.errors import UsageError
from ..shared.monitor import GpuSample, MonitorSample, check_interval
from .metrics import StepRecorder, StepWindow
from .status import SessionRefused

log = logging.getLogger(__name__)

NO_GPU = "no NVIDIA GPU"


class MonitorRefused(SessionRefused):
    """A monitor subscription the daemon will not serve (or no longer); carries its gRPC code."""


def requested_interval(interval_s: float) -> float:
    """The interval of a ``MonitorRequest``: 0 means the default, else 0.25-10 s.

    Raises:
        MonitorRefused: INVALID_ARGUMENT, naming the allowed range.
    """
    try:
        return check_interval(interval_s)
    except UsageError as e:
        raise MonitorRefused(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None


@dataclass(frozen=True)
class TrunkState:
    """The servicer's figures at sampling time (read on the event loop).

    Attributes:
        trunk_cache_bytes: storage all sessions' cache buffers allocate (what the cap counts).
        trunk_cache_used_bytes: of which positions in use.
        trunk_cache_budget_bytes: the cap (``--max-cache-bytes``); 0 without one.
    """

    sessions_open: int
    trunk_cache_bytes: int
    trunk_cache_used_bytes: int = 0
    trunk_cache_budget_bytes: int = 0


@dataclass(frozen=True)
class HostFigures:
    """One reading of the host by ``HostProbe.sample``.

    Attributes:
        cpu_times: psutil's raw counters, the start of the next interval.
    """

    cpu_times: Any
    cpu_percent: float
    load: tuple[float, float, float]
    mem_used_bytes: int
    mem_total_bytes: int
    daemon_rss_bytes: int
    gpus: tuple[GpuSample, ...]
    gpu_status: str


def cpu_busy_percent(before: Any, after: Any) -> float:
    """Host CPU busy between two ``psutil.cpu_times()`` readings, all cores together, 0-100.

    Each sampler keeps its own previous reading: ``psutil.cpu_percent(interval=None)`` keeps one
    process-wide, so two samplers calling it would cut each other's intervals short.
    """

    def total_busy(t: Any) -> tuple[float, float]:
        # guest time is already counted in user/nice on Linux
        total = sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
        return total, total - t.idle - getattr(t, "iowait", 0.0)

    t0, b0 = total_busy(before)
    t1, b1 = total_busy(after)
    if t1 <= t0:
        return 0.0
    return min(100.0, max(0.0, 100.0 * (b1 - b0) / (t1 - t0)))


class HostProbe:
    """Reads the host: CPU, load, memory, the daemon's RSS (psutil) and GPUs (NVML).

    Every method blocks (files under /proc, NVML calls): call them from a worker thread, never
    from the event loop. Thread-safe: NVML is initialised once, under a lock.

    Args:
        nvml: the NVML module to use; ``None`` imports ``pynvml`` on first use. Tests pass a fake.
        process: the process whose RSS is reported (default: this one).
    """

    def __init__(self, nvml: Any | None = None, process: psutil.Process | None = None) -> None:
        self._nvml_module = nvml
        self._process = process or psutil.Process()
        self._lock = threading.Lock()
        self._nvml: Any | None = None
        self._nvml_reason = ""
        self._nvml_tried = False

    def cpu_times(self) -> Any:
        return psutil.cpu_times()

    def sample(self, since_cpu: Any) -> HostFigures:
        """Read everything; CPU busy is measured since ``since_cpu`` (a ``cpu_times()`` reading)."""
        cpu = psutil.cpu_times()
        mem = psutil.virtual_memory()
        gpus, status = self.gpus()
        load = psutil.getloadavg()
        return HostFigures(
            cpu_times=cpu,
            cpu_percent=cpu_busy_percent(since_cpu, cpu),
            load=(float(load[0]), float(load[1]), float(load[2])),
            mem_used_bytes=int(mem.total - mem.available),
            mem_total_bytes=int(mem.total),
            daemon_rss_bytes=int(self._process.memory_info().rss),
            gpus=gpus,
            gpu_status=status,
        )

    def process_figures(self) -> tuple[int, float]:
        """The daemon's RSS and its CPU seconds (user + system), for Prometheus counters."""
        with self._process.oneshot():
            cpu = self._process.cpu_times()
            return int(self._process.memory_info().rss), float(cpu.user + cpu.system)

    def _ensure_nvml(self) -> tuple[Any | None, str]:
        """The initialised NVML module, or None and why. Tried once: no GPU appears later."""
        with self._lock:
            if not self._nvml_tried:
                self._nvml_tried = True
                self._nvml, self._nvml_reason = self._init_nvml()
                if self._nvml is None:
                    log.info("GPU monitoring off: %s", self._nvml_reason)
            return self._nvml, self._nvml_reason

    def _init_nvml(self) -> tuple[Any | None, str]:
        try:
            nvml = self._nvml_module if self._nvml_module is not None else importlib.import_module("pynvml")
        except ImportError:
            return None, f"{NO_GPU}: nvidia-ml-py is not installed (pip install 'splitlm[daemon]')"
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as e:
            return None, f"{NO_GPU}: {e}"
        except Exception as e:  # a broken driver install must not kill the sampler
            log.warning("NVML failed to initialise", exc_info=True)
            return None, f"{NO_GPU}: NVML failed to initialise ({type(e).__name__}: {e})"
        try:
            count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError as e:
            count, why = 0, str(e)
        else:
            why = "NVML found no devices"
        log.info("NVML: %d GPU(s)", count)
        return nvml, "" if count else f"{NO_GPU}: {why}"

    def gpus(self) -> tuple[tuple[GpuSample, ...], str]:
        """Every GPU NVML can read, and "" or the reason some (or all) are missing."""
        nvml, reason = self._ensure_nvml()
        if nvml is None:
            return (), reason
        try:
            count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError as e:
            return (), f"NVML: {e}"
        if count == 0:
            return (), f"{NO_GPU}: NVML found no devices"
        gpus, problems = [], []
        for i in range(count):
            try:
                gpus.append(self._gpu(nvml, i))
            except nvml.NVMLError as e:
                problems.append(f"gpu{i}: {e}")
        return tuple(gpus), "; ".join(problems)

    @staticmethod
    def _gpu(nvml: Any, index: int) -> GpuSample:
        h = nvml.nvmlDeviceGetHandleByIndex(index)
        name = nvml.nvmlDeviceGetName(h)
        mem = nvml.nvmlDeviceGetMemoryInfo(h)

        def optional(read: Callable[[], float]) -> float | None:
            try:
                return float(read())
            except nvml.NVMLError:  # e.g. NotSupported on some boards
                return None

        power_mw = optional(lambda: nvml.nvmlDeviceGetPowerUsage(h))
        return GpuSample(
            index=index,
            name=name.decode() if isinstance(name, bytes) else str(name),
            utilization_percent=float(nvml.nvmlDeviceGetUtilizationRates(h).gpu),
            memory_used_bytes=int(mem.used),
            memory_total_bytes=int(mem.total),
            temperature_c=optional(lambda: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU)),
            power_w=None if power_mw is None else power_mw / 1000.0,
        )

    def close(self) -> None:
        """Shut NVML down if it was initialised. Blocks."""
        with self._lock:
            if self._nvml is not None:
                with contextlib.suppress(self._nvml.NVMLError):
                    self._nvml.nvmlShutdown()
            self._nvml, self._nvml_tried = None, False


_Item: TypeAlias = "MonitorSample | MonitorRefused"


class Subscription:
    """One subscriber's samples: ``async for sample in subscription``. Loop only.

    Holds at most ``maxsize`` samples; when the subscriber lags, the oldest are dropped (a
    monitor wants the newest figures, and the sampler must never wait for a slow reader).
    """

    def __init__(self, maxsize: int) -> None:
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize)
        self.dropped = 0

    def offer(self, item: _Item) -> None:
        if self._queue.full():
            self._queue.get_nowait()
            self.dropped += 1
        self._queue.put_nowait(item)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> MonitorSample:
        """The next sample.

        Raises:
            MonitorRefused: UNAVAILABLE when the daemon shuts down, INTERNAL when sampling failed.
        """
        item = await self._queue.get()
        if isinstance(item, MonitorRefused):
            raise item
        return item


class _Sampler:
    """Samples every ``interval_s`` for its subscribers, from its first until its last leaves."""

    def __init__(self, hub: MonitorHub, interval_s: float) -> None:
        self.hub = hub
        self.interval_s = interval_s
        self.subscribers: set[Subscription] = set()
        self.samples = 0
        self.task = asyncio.get_running_loop().create_task(
            self._run(), name=f"monitor-sampler-{interval_s:g}s"
        )

    def broadcast(self, item: _Item) -> None:
        for sub in self.subscribers:
            sub.offer(item)

    async def _run(self) -> None:
        hub, period = self.hub, self.interval_s
        clock = hub.recorder.clock
        log.info("monitor: sampling every %g s", period)
        try:
            cpu = await asyncio.to_thread(hub.probe.cpu_times)
            start = last = clock()
            tick = 1
            while True:
                await asyncio.sleep(max(0.0, start + tick * period - clock()))
                host = await asyncio.to_thread(hub.probe.sample, cpu)
                wall, now = time.time(), clock()
                cpu = host.cpu_times
                self.samples += 1
                self.broadcast(hub.build(period, wall, host, hub.recorder.window(last, now)))
                last = now
                # after a late tick (slow NVML, busy loop) the next one stays on the grid but at
                # least half a period away: no burst, and no window too short to mean anything
                tick = math.floor((now - start) / period) + 1
                if start + tick * period - now < period / 2:
                    tick += 1
        except asyncio.CancelledError:
            log.info("monitor: stopped sampling every %g s after %d samples", period, self.samples)
            raise
        except Exception as e:
            log.exception("monitor sampler (%g s) failed", period)
            hub.forget(self)
            self.broadcast(MonitorRefused(grpc.StatusCode.INTERNAL, f"monitor sampling failed: {e}"))


class MonitorHub:
    """The daemon's samplers, by interval. Loop only.

    Args:
        probe: reads the host (called in worker threads).
        recorder: the servicer's step recorder (steps, tokens/s, latency, queue depth).
        state: the servicer's sessions and cache bytes, read at sampling time.
        queue_size: samples kept for a subscriber that lags.
    """

    def __init__(
        self,
        probe: HostProbe,
        recorder: StepRecorder,
        state: Callable[[], TrunkState],
        queue_size: int = 4,
    ) -> None:
        self.probe = probe
        self.recorder = recorder
        self.state = state
        self.queue_size = queue_size
        self._samplers: dict[float, _Sampler] = {}
        self._stopping: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def intervals(self) -> list[float]:
        """Intervals being sampled now (one sampler each)."""
        return sorted(self._samplers)

    def build(self, interval_s: float, wall: float, host: HostFigures, w: StepWindow) -> MonitorSample:
        """One sample from a host reading and a step window (on the loop)."""
        state = self.state()
        return MonitorSample(
            time=wall,
            interval_s=interval_s,
            cpu_percent=host.cpu_percent,
            load_1m=host.load[0],
            load_5m=host.load[1],
            load_15m=host.load[2],
            mem_used_bytes=host.mem_used_bytes,
            mem_total_bytes=host.mem_total_bytes,
            daemon_rss_bytes=host.daemon_rss_bytes,
            gpus=host.gpus,
            gpu_status=host.gpu_status,
            sessions_open=state.sessions_open,
            steps_queued=len(self.recorder.queue),
            steps=w.steps,
            tokens_per_s=w.tokens_per_s,
            step_p50_ms=w.p50_ms,
            step_p95_ms=w.p95_ms,
            trunk_cache_bytes=state.trunk_cache_bytes,
            trunk_cache_used_bytes=state.trunk_cache_used_bytes,
            trunk_cache_budget_bytes=state.trunk_cache_budget_bytes,
        )

    @contextlib.asynccontextmanager
    async def subscribe(self, interval_s: float) -> AsyncIterator[Subscription]:
        """Samples every ``interval_s`` for the body of the ``async with`` (validate it first with
        ``requested_interval``); the sampler stops when its last subscriber leaves.

        Raises:
            MonitorRefused: UNAVAILABLE once the hub is closed (the daemon is shutting down).
        """
        if self._closed:
            raise MonitorRefused(grpc.StatusCode.UNAVAILABLE, "the daemon is shutting down")
        if interval_s <= 0:
            raise ValueError(f"interval must be > 0, got {interval_s}")
        sampler = self._samplers.get(interval_s)
        if sampler is None:
            sampler = self._samplers[interval_s] = _Sampler(self, interval_s)
        sub = Subscription(self.queue_size)
        sampler.subscribers.add(sub)
        log.debug("monitor: subscriber at %g s (%d)", interval_s, len(sampler.subscribers))
        try:
            yield sub
        finally:
            sampler.subscribers.discard(sub)
            if not sampler.subscribers:
                self.forget(sampler)
                self._stop(sampler)

    def forget(self, sampler: _Sampler) -> None:
        if self._samplers.get(sampler.interval_s) is sampler:
            del self._samplers[sampler.interval_s]

    def _stop(self, sampler: _Sampler) -> None:
        if not sampler.task.done():
            sampler.task.cancel()
            self._stopping.add(sampler.task)
            sampler.task.add_done_callback(self._stopping.discard)

    async def close(self) -> None:
        """End every subscription with UNAVAILABLE, stop the samplers and NVML. Loop only."""
        self._closed = True
        for sampler in list(self._samplers.values()):
            sampler.broadcast(
                MonitorRefused(grpc.StatusCode.UNAVAILABLE, "the daemon is shutting down")
            )
            self.forget(sampler)
            self._stop(sampler)
        if self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)
        await asyncio.to_thread(self.probe.close)
