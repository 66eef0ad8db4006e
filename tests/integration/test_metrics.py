"""``splitlm-trunkd --metrics``: a real daemon process scraped over real HTTP on loopback."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from splitlm.shared.client import TrunkClient
from splitlm.shared.plan import Fingerprint
from tests.conftest import free_port, run_trunkd, start_daemon
from tests.daemon.test_prometheus import parse

HIDDEN = 64  # tiny_config's hidden size


def scrape(port: int) -> dict[str, list[tuple[str, float]]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return parse(r.read().decode())


def value(m: dict[str, list[tuple[str, float]]], name: str) -> float:
    (_, v), = m[name]
    return v


def test_scrape_counts_steps_and_sessions(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    port = free_port()
    d = start_daemon(tiny_models["llama"], f"unix:{tmp_path / 't.sock'}", tmp_path / "d.log",
                     "--split", "2:4", "--metrics", f"127.0.0.1:{port}")
    try:
        before = scrape(port)
        assert value(before, "splitlm_steps_total") == 0 and value(before, "splitlm_sessions_open") == 0
        (labels, _), = before["splitlm_trunk_info"]
        assert 'layers="2:4"' in labels and 'device="cpu"' in labels
        assert before["splitlm_gpus"][0][0].startswith('{reason="no NVIDIA GPU')  # this machine: none
        client = TrunkClient(d.address)
        p = client.info().plan
        session = client.open_session(
            Fingerprint(p.config_digest, p.weights_digest, p.trunk_start, p.trunk_end), torch.float32
        )
        session.step(torch.randn(1, 5, HIDDEN), 0)
        for pos in range(5, 8):
            session.step(torch.randn(1, 1, HIDDEN), pos)
        during = scrape(port)
        session.close()
        client.close()
        assert value(during, "splitlm_sessions_open") == 1
        assert value(during, "splitlm_steps_total") == 4
        assert value(during, "splitlm_positions_total") == 8
        assert value(during, "splitlm_trunk_compute_seconds_total") > 0
        # 2 layers x 256 B a position; the buffers hold the 5-token prefill exactly, then 8 more
        assert value(during, "splitlm_trunk_cache_bytes") == 13 * 512
        assert value(during, "splitlm_trunk_cache_used_bytes") == 8 * 512
        assert value(during, "process_resident_memory_bytes") > 50 * 2**20
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10)
        assert e.value.code == 404
    finally:
        assert d.stop() == 0, d.log_text()[-3000:]
    assert "Prometheus metrics on http://127.0.0.1" in d.log_text() and "Traceback" not in d.log_text()
    with pytest.raises(OSError):  # the exporter's port closes with the daemon
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_bad_metrics_address_is_refused_naming_the_key(tmp_path: Path) -> None:
    r = run_trunkd("--metrics", "unix:/tmp/x.sock", "--listen", f"unix:{tmp_path / 't.sock'}")
    assert r.returncode == 2, r.stderr
    assert "metrics" in r.stderr and "host:port" in r.stderr and "Traceback" not in r.stderr


def test_a_metrics_port_in_use_fails_the_start_clearly(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = run_trunkd("--model", str(tiny_models["llama"]), "--split", "2:4", "--threads", "1",
                       "--listen", f"unix:{tmp_path / 't.sock'}", "--metrics", f"127.0.0.1:{port}")
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert f"cannot serve metrics on 127.0.0.1:{port}" in out and "Traceback" not in out
