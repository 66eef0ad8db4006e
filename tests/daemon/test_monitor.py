"""The monitor sampler and step metrics, without a socket: host probe (real psutil, a fake NVML
module, since NVML cannot run here), shared per-interval samplers, and the step recorder."""

from __future__ import annotations

import asyncio
import math
import sys
import threading
import time
from collections import namedtuple
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from splitlm.daemon.metrics import StepRecorder
from splitlm.daemon.monitor import (
    HostProbe,
    MonitorHub,
    MonitorRefused,
    Subscription,
    TrunkState,
    cpu_busy_percent,
    requested_interval,
)
from splitlm.protos import trunk_pb2 as pb
from splitlm.shared.monitor import GpuSample, MonitorSample, format_line

FAST = 0.05  # the hub itself accepts any interval; the RPC's 0.25-10 s is checked by requested_interval


class FakeNvml:
    """Just enough of ``pynvml``: two GPUs; the second reports no temperature and no power.

    Args:
        init_error: raised by ``nvmlInit`` (e.g. ``LibraryNotFound()``).
        broken: device indices whose memory query fails.
    """

    class NVMLError(Exception):
        pass

    class NVMLError_LibraryNotFound(NVMLError):
        def __str__(self) -> str:
            return "NVML Shared Library Not Found"

    class NVMLError_NotSupported(NVMLError):
        def __str__(self) -> str:
            return "Not Supported"

    class NVMLError_GpuIsLost(NVMLError):
        def __str__(self) -> str:
            return "GPU is lost"

    NVML_TEMPERATURE_GPU = 0

    def __init__(self, init_error: Exception | None = None, broken: tuple[int, ...] = ()) -> None:
        self.init_error = init_error
        self.broken = broken
        self.inits = 0
        self.shutdowns = 0
        self.count_calls = 0

    def nvmlInit(self) -> None:
        self.inits += 1
        if self.init_error is not None:
            raise self.init_error

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        self.count_calls += 1
        return 2

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, h: int) -> bytes | str:
        return b"Fake A100" if h == 0 else "Fake T4"  # older pynvml returns bytes

    def nvmlDeviceGetUtilizationRates(self, h: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=87 if h == 0 else 3, memory=20)

    def nvmlDeviceGetMemoryInfo(self, h: int) -> SimpleNamespace:
        if h in self.broken:
            raise self.NVMLError_GpuIsLost()
        return SimpleNamespace(used=(h + 1) * 2**30, total=16 * 2**30, free=0)

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        assert sensor == self.NVML_TEMPERATURE_GPU
        if h == 1:
            raise self.NVMLError_NotSupported()
        return 65

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        if h == 1:
            raise self.NVMLError_NotSupported()
        return 250_500  # milliwatts


async def wait_until(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def hub_for(probe: HostProbe, recorder: StepRecorder | None = None, **kw: Any) -> MonitorHub:
    return MonitorHub(probe, StepRecorder() if recorder is None else recorder, lambda: TrunkState(2, 12345), **kw)


async def take(sub: Subscription, n: int) -> list[MonitorSample]:
    return [await asyncio.wait_for(sub.__anext__(), 10) for _ in range(n)]


class TestHostProbe:
    def test_two_fake_gpus(self) -> None:
        gpus, status = HostProbe(nvml=FakeNvml()).gpus()
        assert status == ""
        assert gpus == (
            GpuSample(0, "Fake A100", 87.0, 2**30, 16 * 2**30, 65.0, 250.5),
            GpuSample(1, "Fake T4", 3.0, 2 * 2**30, 16 * 2**30, None, None),
        )

    def test_nvml_library_not_found(self) -> None:
        nvml = FakeNvml(init_error=FakeNvml.NVMLError_LibraryNotFound())
        probe = HostProbe(nvml=nvml)
        for _ in range(3):
            assert probe.gpus() == ((), "no NVIDIA GPU: NVML Shared Library Not Found")
        assert nvml.inits == 1, "a missing NVML is found out once, not on every sample"
        probe.close()
        assert nvml.shutdowns == 0

    def test_pynvml_not_installed(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
        gpus, status = HostProbe().gpus()
        assert gpus == ()
        assert status.startswith("no NVIDIA GPU:") and "nvidia-ml-py" in status

    def test_a_lost_gpu_is_named_and_the_others_still_reported(self) -> None:
        gpus, status = HostProbe(nvml=FakeNvml(broken=(1,))).gpus()
        assert [g.index for g in gpus] == [0]
        assert status == "gpu1: GPU is lost"

    def test_close_shuts_nvml_down(self) -> None:
        nvml = FakeNvml()
        probe = HostProbe(nvml=nvml)
        probe.gpus()
        probe.close()
        assert (nvml.inits, nvml.shutdowns) == (1, 1)

    def test_host_figures_from_real_psutil(self) -> None:
        probe = HostProbe(nvml=FakeNvml())
        before = probe.cpu_times()
        sum(i * i for i in range(200_000))  # some CPU time between the two readings
        h = probe.sample(before)
        assert 0.0 <= h.cpu_percent <= 100.0
        assert 0 < h.mem_used_bytes < h.mem_total_bytes
        assert 10 * 2**20 < h.daemon_rss_bytes < h.mem_total_bytes
        assert all(x >= 0 for x in h.load)
        assert len(h.gpus) == 2

    def test_cpu_busy_percent(self) -> None:
        T = namedtuple("T", "user nice system idle iowait guest guest_nice")
        before = T(100, 0, 50, 800, 50, 0, 0)
        after = T(130, 0, 60, 840, 60, 10, 0)  # guest time is part of user: not counted twice
        assert cpu_busy_percent(before, after) == pytest.approx(100 * 40 / 90)
        assert cpu_busy_percent(after, after) == 0.0


class TestInterval:
    @pytest.mark.parametrize("asked,got", [(0.0, 1.0), (0.25, 0.25), (10.0, 10.0), (2.5, 2.5)])
    def test_allowed(self, asked: float, got: float) -> None:
        assert requested_interval(asked) == got

    def test_float32_rounding_shares_a_sampler(self) -> None:
        as_sent = pb.MonitorRequest.FromString(pb.MonitorRequest(interval_s=0.3).SerializeToString())
        assert as_sent.interval_s != 0.3  # a 32-bit float on the wire
        assert requested_interval(as_sent.interval_s) == 0.3

    @pytest.mark.parametrize("asked", [0.1, 0.2499, 10.01, 60.0, -1.0, math.nan, math.inf])
    def test_refused_with_the_range(self, asked: float) -> None:
        with pytest.raises(MonitorRefused) as e:
            requested_interval(asked)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "0.25-10 s" in str(e.value)


class CountingProbe(HostProbe):
    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.samples = 0
        self.fail: Exception | None = None

    def sample(self, since_cpu: Any) -> Any:
        if self.fail is not None:
            raise self.fail
        self.samples += 1
        return super().sample(since_cpu)


class TestHub:
    async def test_subscribers_at_one_interval_share_each_sample(self) -> None:
        probe = CountingProbe(nvml=FakeNvml())
        hub = hub_for(probe)
        async with hub.subscribe(FAST) as a:
            first = await take(a, 1)
            async with hub.subscribe(FAST) as b:
                got_a, got_b = await asyncio.gather(take(a, 4), take(b, 4))
                assert hub.intervals == [FAST]
        times_a = [s.time for s in first + got_a]
        times_b = [s.time for s in got_b]
        assert len(set(times_a)) == len(times_a) == 5 and times_a == sorted(times_a)
        # b joined between two ticks: it gets the very samples a gets (off by one at most, when
        # a tick came before b's subscription took effect)
        assert set(times_b[:3]) <= set(times_a)
        # 9 deliveries, at most 6 distinct ticks; the probe ran once per tick (+1 in flight at exit)
        ticks = set(times_a) | set(times_b)
        assert len(ticks) <= 6
        assert len(ticks) <= probe.samples <= len(ticks) + 1
        await hub.close()

    async def test_sample_contents(self) -> None:
        recorder = StepRecorder()
        hub = hub_for(HostProbe(nvml=FakeNvml()), recorder)
        async with hub.subscribe(FAST) as sub:
            await take(sub, 1)
            for ms in (10, 20, 30):
                recorder.record(4, ms / 1e3)
            while (s := (await take(sub, 1))[0]).steps == 0:
                pass
        await hub.close()
        assert s.interval_s == FAST
        assert (s.steps, s.step_p50_ms, s.sessions_open, s.trunk_cache_bytes) == (3, 20.0, 2, 12345)
        assert s.step_p95_ms == pytest.approx(29.0)
        # 12 positions over one interval of about FAST seconds (more when the loop lags)
        assert s.tokens_per_s > 12 / 1.0
        assert s.steps_queued == 0
        assert len(s.gpus) == 2 and s.gpu_status == ""
        assert abs(s.time - time.time()) < 5

    async def test_different_intervals_get_their_own_sampler(self) -> None:
        hub = hub_for(HostProbe(nvml=FakeNvml()))
        async with hub.subscribe(FAST) as fast, hub.subscribe(2 * FAST) as slow:
            assert hub.intervals == [FAST, 2 * FAST]
            f, s = await asyncio.gather(take(fast, 4), take(slow, 2))
        assert {x.interval_s for x in f} == {FAST} and {x.interval_s for x in s} == {2 * FAST}
        assert hub.intervals == []
        await hub.close()

    async def test_a_subscriber_that_leaves_costs_nothing(self) -> None:
        probe = CountingProbe(nvml=FakeNvml())
        hub = hub_for(probe)

        async def listen() -> None:
            async with hub.subscribe(FAST) as sub:
                async for _ in sub:
                    pass

        task = asyncio.create_task(listen())
        await wait_until(lambda: probe.samples >= 2)
        task.cancel()  # what grpc.aio does when the client goes away
        with pytest.raises(asyncio.CancelledError):
            await task
        assert hub.intervals == []
        await wait_until(lambda: not hub._stopping)  # the sampler task has ended
        n = probe.samples
        await asyncio.sleep(5 * FAST)  # no sampler runs: nothing to wait for
        assert probe.samples == n
        await hub.close()

    async def test_close_ends_subscriptions_with_unavailable(self) -> None:
        nvml = FakeNvml()
        hub = hub_for(HostProbe(nvml=nvml))
        async with hub.subscribe(FAST) as sub:
            await take(sub, 1)
            await hub.close()
            with pytest.raises(MonitorRefused) as e:
                await take(sub, 5)  # queued samples first, then the end
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        assert nvml.shutdowns == 1
        with pytest.raises(MonitorRefused) as e2:
            async with hub.subscribe(FAST):
                pass
        assert e2.value.code == grpc.StatusCode.UNAVAILABLE

    async def test_a_failing_sampler_ends_its_subscribers_with_internal(self) -> None:
        probe = CountingProbe(nvml=FakeNvml())
        probe.fail = OSError("no /proc")
        hub = hub_for(probe)
        async with hub.subscribe(FAST) as sub:
            with pytest.raises(MonitorRefused) as e:
                await take(sub, 1)
        assert e.value.code == grpc.StatusCode.INTERNAL and "no /proc" in str(e.value)
        assert hub.intervals == []
        await hub.close()

    async def test_a_lagging_subscriber_keeps_the_newest(self) -> None:
        sub = Subscription(maxsize=2)
        samples = [sample(time=float(i)) for i in range(5)]
        for s in samples:
            sub.offer(s)
        assert await take(sub, 2) == samples[3:]
        assert sub.dropped == 3


class TestStepRecorder:
    def test_an_empty_window_reads_zero_not_nan(self) -> None:
        """The monitor's wire format: 0 without steps (``shared.stats.percentile`` says NaN)."""
        w = StepRecorder(horizon_s=30, clock=lambda: 5.0).window(0.0, 5.0)
        assert (w.steps, w.p50_ms, w.p95_ms) == (0, 0.0, 0.0)

    def test_window_picks_the_interval_and_rates(self) -> None:
        now = [0.0]
        rec = StepRecorder(horizon_s=30, clock=lambda: now[0])
        for t, positions, ms in ((1.0, 20, 50), (2.0, 1, 5), (2.5, 1, 7), (3.0, 1, 6)):
            now[0] = t
            rec.record(positions, ms / 1e3)
        w = rec.window(1.5, 3.5)
        assert (w.steps, w.positions, w.seconds) == (3, 3, 2.0)
        assert w.tokens_per_s == 1.5
        assert w.p50_ms == pytest.approx(6.0)
        empty = rec.window(5, 6)
        assert (empty.steps, empty.tokens_per_s, empty.p50_ms, empty.p95_ms) == (0, 0.0, 0.0, 0.0)

    def test_records_older_than_the_horizon_are_dropped(self) -> None:
        now = [0.0]
        rec = StepRecorder(horizon_s=10, clock=lambda: now[0])
        for i in range(100):
            now[0] = i * 0.5
            rec.record(1, 0.001)
        assert len(rec) == 21  # [39.5 - 10, 49.5]

    async def test_queue_counts_steps_waiting_for_the_executor(self) -> None:
        rec = StepRecorder()
        gate = threading.Event()
        with ThreadPoolExecutor(max_workers=1) as ex:
            runs = [asyncio.create_task(rec.queue.run(ex, gate.wait, 10)) for _ in range(3)]
            await wait_until(lambda: len(rec.queue) == 2)  # one runs, two wait
            runs[2].cancel()  # a client gone while its step waited
            await asyncio.gather(runs[2], return_exceptions=True)
            assert len(rec.queue) == 1
            gate.set()
            assert await asyncio.gather(*runs[:2]) == [True, True]
        assert len(rec.queue) == 0


def sample(**kw: Any) -> MonitorSample:
    values: dict[str, Any] = dict(
        time=1.7e9, interval_s=1.0, cpu_percent=12.5, load_1m=0.5, load_5m=0.25, load_15m=0.125,
        mem_used_bytes=3 * 2**30, mem_total_bytes=8 * 2**30, daemon_rss_bytes=400 * 2**20,
        gpus=(GpuSample(0, "Fake A100", 87.0, 2**30, 16 * 2**30, 65.0, 250.5),
              GpuSample(1, "Fake T4", 3.0, 2**30, 16 * 2**30, None, None)),
        gpu_status="", sessions_open=1, steps_queued=0, steps=10, tokens_per_s=10.0,
        step_p50_ms=4.0, step_p95_ms=6.5, trunk_cache_bytes=2**20,
    )
    values.update(kw)
    return MonitorSample(**values)


class TestSampleCodec:
    def test_protobuf_round_trip_keeps_missing_readings_missing(self) -> None:
        s = sample()
        back = MonitorSample.from_pb(pb.MonitorSample.FromString(s.to_pb().SerializeToString()))
        assert back == s
        assert back.gpus[1].temperature_c is None and back.gpus[1].power_w is None

    def test_to_dict_keys_are_the_field_names(self) -> None:
        d = sample().to_dict()
        assert list(d) == [f.name for f in fields(MonitorSample)]
        assert d["gpus"][0] == {
            "index": 0, "name": "Fake A100", "utilization_percent": 87.0, "memory_used_bytes": 2**30,
            "memory_total_bytes": 16 * 2**30, "temperature_c": 65.0, "power_w": 250.5,
        }
        assert d["gpus"][1]["temperature_c"] is None

    def test_format_line(self) -> None:
        line = format_line(sample())
        assert "cpu  12.5%" in line and "gpu0 87% 1.0/16.0 GiB 65°C 250 W" in line
        assert "gpu1 3% 1.0/16.0 GiB" in line and "10.0 tok/s" in line and "p95 6.5 ms" in line
        no_gpu = format_line(sample(gpus=(), gpu_status="no NVIDIA GPU: NVML Shared Library Not Found"))
        assert "| no NVIDIA GPU: NVML Shared Library Not Found  |" in no_gpu
