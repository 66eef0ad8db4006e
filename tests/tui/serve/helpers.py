"""Starting a real ``splitlm serve`` for the tests (and ``scripts/bench_serve.py``): a subprocess
on a free loopback port, ready once ``/health`` answers 200."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import free_port


def start_serve(
    trunk: str, model: str | Path, log: Path, *extra: str, threads: int = 1
) -> tuple[subprocess.Popen[bytes], str]:
    """``splitlm serve --trunk TRUNK --model MODEL --threads THREADS *extra`` on a free port (its
    idle OpenMP threads passive, as the launcher's daemons); its process and base URL.

    Raises:
        AssertionError: it exited, or never answered (with its log's tail).
    """
    port = free_port()
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "splitlm.tui.cli", "serve", "--trunk", trunk, "--model", str(model),
             "--listen", f"127.0.0.1:{port}", "--threads", str(threads), *extra],
            stdout=fh, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"),
        )
    url = f"http://127.0.0.1:{port}"
    for _ in range(1500):
        if proc.poll() is not None:
            raise AssertionError(f"splitlm serve exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    stop_serve(proc)
    raise AssertionError(f"splitlm serve never answered: {log.read_text()[-2000:]}")


def stop_serve(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
