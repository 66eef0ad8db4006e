"""The Prometheus exposition and its HTTP server, without a model: GPUs from the fake NVML."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import sys

import pytest

from splitlm.daemon.metrics import StepRecorder, StepTotals
from splitlm.daemon.monitor import HostProbe
from splitlm.daemon.prometheus import MetricsServer, Snapshot, encode, render
from splitlm.shared.errors import ExitCode, UsageError
from tests.conftest import free_port
from tests.daemon.test_monitor import FakeNvml

LINE = re.compile(r'^[a-z_:][a-z0-9_:]*(\{([a-z_]+="([^"\\]|\\.)*",?)*\})? ([-+0-9.eE]+|[+-]Inf|NaN)$')


def parse(text: str) -> dict[str, list[tuple[str, float]]]:
    """Samples by metric name; every line must be a comment or a well-formed sample, and every
    metric must be declared with HELP and TYPE before its samples."""
    out: dict[str, list[tuple[str, float]]] = {}
    declared: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            assert kind in ("counter", "gauge"), line
            declared.add(name)
            continue
        if line.startswith("# HELP "):
            continue
        assert LINE.match(line), f"not exposition format: {line!r}"
        name = re.split(r"[{ ]", line, maxsplit=1)[0]
        assert name in declared, f"{name} has no # TYPE line before it"
        labels = line[len(name) : line.rindex(" ")]
        out.setdefault(name, []).append((labels, float(line.rsplit(" ", 1)[1])))
    return out


def snapshot(**kw: object) -> Snapshot:
    gpus, status = HostProbe(nvml=FakeNvml()).gpus()
    base: dict[str, object] = dict(
        plan={"model": 'tiny "llama"\\x', "layers": "2:4", "fingerprint": "abc"},
        sessions_open=3, max_sessions=64, steps_queued=1, cache_bytes=4096, cache_budget_bytes=2**30,
        totals=StepTotals(steps=10, positions=25, compute_s=0.5), rss_bytes=123456789, cpu_seconds=12.25,
        gpus=gpus, gpu_status=status, batches=None, batched_steps=None,
    )
    base.update(kw)
    return Snapshot(**base)  # type: ignore[arg-type]


class TestRender:
    def test_every_figure_with_two_fake_gpus(self) -> None:
        m = parse(render(snapshot()))
        assert m["splitlm_sessions_open"] == [("", 3)]
        assert m["splitlm_steps_total"] == [("", 10)] and m["splitlm_positions_total"] == [("", 25)]
        assert m["splitlm_trunk_compute_seconds_total"] == [("", 0.5)]
        assert m["splitlm_trunk_cache_budget_bytes"] == [("", 2**30)]
        assert m["process_resident_memory_bytes"] == [("", 123456789)]
        assert m["splitlm_gpus"] == [("", 2)]
        assert m["splitlm_gpu_utilization_percent"] == [
            ('{gpu="0",name="Fake A100"}', 87.0), ('{gpu="1",name="Fake T4"}', 3.0),
        ]
        # the T4 reports no temperature or power: it is absent there, not 0
        assert m["splitlm_gpu_temperature_celsius"] == [('{gpu="0",name="Fake A100"}', 65.0)]
        assert m["splitlm_gpu_power_watts"] == [('{gpu="0",name="Fake A100"}', 250.5)]
        assert "splitlm_batches_total" not in m  # batching off

    def test_labels_are_escaped(self) -> None:
        (labels, value), = parse(render(snapshot()))["splitlm_trunk_info"]
        # prometheus_client writes label names in sorted order (the hand-written one kept the plan's)
        assert labels == '{fingerprint="abc",layers="2:4",model="tiny \\"llama\\"\\\\x"}' and value == 1

    def test_every_name_and_type_as_before_prometheus_client(self) -> None:
        """The names, types and order of the hand-written exposition this replaced (plus the cache
        bytes in use, added with the allocated-bytes cap): dashboards and alerts keep working."""
        text = render(snapshot(batches=4, batched_steps=11))
        types = [tuple(line.split()[2:4]) for line in text.splitlines() if line.startswith("# TYPE ")]
        assert types == [
            ("splitlm_trunk_info", "gauge"), ("splitlm_up", "gauge"), ("splitlm_sessions_open", "gauge"),
            ("splitlm_sessions_max", "gauge"), ("splitlm_steps_queued", "gauge"),
            ("splitlm_trunk_cache_bytes", "gauge"), ("splitlm_trunk_cache_used_bytes", "gauge"),
            ("splitlm_trunk_cache_budget_bytes", "gauge"), ("splitlm_steps_total", "counter"), ("splitlm_positions_total", "counter"),
            ("splitlm_trunk_compute_seconds_total", "counter"), ("splitlm_batches_total", "counter"),
            ("splitlm_batched_steps_total", "counter"), ("process_resident_memory_bytes", "gauge"),
            ("process_cpu_seconds_total", "counter"), ("splitlm_gpus", "gauge"),
            ("splitlm_gpu_utilization_percent", "gauge"), ("splitlm_gpu_memory_used_bytes", "gauge"),
            ("splitlm_gpu_memory_total_bytes", "gauge"), ("splitlm_gpu_temperature_celsius", "gauge"),
            ("splitlm_gpu_power_watts", "gauge"),
        ]
        assert all(f"# HELP {name} " in text for name, _ in types)

    def test_openmetrics_when_the_scraper_asks(self) -> None:
        body, content_type = encode(snapshot(), "application/openmetrics-text;version=1.0.0,text/plain;q=0.5")
        text = body.decode()
        assert content_type.startswith("application/openmetrics-text; version=1.0.0")
        assert text.endswith("# EOF\n")
        assert "# TYPE splitlm_steps counter" in text and "\nsplitlm_steps_total 10.0\n" in text
        assert encode(snapshot(), "")[1] == "text/plain; version=0.0.4; charset=utf-8"

    def test_cache_bytes_allocated_and_in_use(self) -> None:
        grown = dataclasses.replace(snapshot(), cache_bytes=4096, cache_used_bytes=1024)
        m = parse(render(grown))
        assert m["splitlm_trunk_cache_bytes"] == [("", 4096)]
        assert m["splitlm_trunk_cache_used_bytes"] == [("", 1024)]

    def test_no_gpu_says_why_and_batching_counts(self) -> None:
        gpus, status = HostProbe(nvml=FakeNvml(init_error=FakeNvml.NVMLError_LibraryNotFound())).gpus()
        m = parse(render(snapshot(gpus=gpus, gpu_status=status, batches=4, batched_steps=11, stopping=True)))
        assert m["splitlm_gpus"] == [('{reason="no NVIDIA GPU: NVML Shared Library Not Found"}', 0)]
        assert not any(k.startswith("splitlm_gpu_") for k in m)
        assert m["splitlm_batches_total"] == [("", 4)] and m["splitlm_batched_steps_total"] == [("", 11)]
        assert m["splitlm_up"] == [("", 0)]


async def _request(port: int, raw: bytes) -> tuple[str, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    return head.split("\r\n")[0], body


def test_server_answers_get_metrics_only_and_survives_garbage() -> None:
    async def main() -> None:
        recorder = StepRecorder()
        recorder.record(4, 0.01)
        recorder.record(1, 0.002)

        async def collect() -> Snapshot:
            return snapshot(totals=recorder.totals)

        port = free_port()
        server = MetricsServer(f"127.0.0.1:{port}", collect)
        await server.start()
        try:
            status, body = await _request(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            assert status == "HTTP/1.1 200 OK"
            assert parse(body)["splitlm_positions_total"] == [("", 5)]
            assert (await _request(port, b"GET / HTTP/1.1\r\n\r\n"))[0] == "HTTP/1.1 404 Not Found"
            assert (await _request(port, b"POST /metrics HTTP/1.1\r\n\r\n"))[0].startswith("HTTP/1.1 405")
            assert (await _request(port, b"G" * 20000))[0].startswith("HTTP/1.1 431")
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"\x00\xff garbage")  # then hang up mid-request
            writer.close()
            status, _ = await _request(port, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n")
            assert status == "HTTP/1.1 200 OK" and server.scrapes == 2
            status, body = await _request(
                port, b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text; version=1.0.0\r\n\r\n"
            )
            assert status == "HTTP/1.1 200 OK" and body.endswith("# EOF\n")
        finally:
            await server.close()

    asyncio.run(main())


def test_metrics_without_prometheus_client_is_a_clear_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:

    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import fails as if absent
    server = MetricsServer(f"127.0.0.1:{free_port()}", lambda: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(UsageError, match=r"pip install 'splitlm\[daemon\]'") as info:
        asyncio.run(server.start())
    assert info.value.exit_code == ExitCode.USAGE
    assert server._server is None  # nothing was bound


def test_server_binds_the_configured_address_only() -> None:
    """127.0.0.1 is not every address: the same port on 127.0.0.2 (also loopback) is closed."""

    async def main() -> None:
        async def collect() -> Snapshot:
            return snapshot()

        port = free_port()
        server = MetricsServer(f"127.0.0.1:{port}", collect)
        await server.start()
        try:
            assert (await _request(port, b"GET /metrics HTTP/1.1\r\n\r\n"))[0] == "HTTP/1.1 200 OK"
            with pytest.raises(OSError):
                await asyncio.open_connection("127.0.0.2", port)
        finally:
            await server.close()

    asyncio.run(main())
