"""The daemon killed (-9) mid-reply and started again: ``splitlm serve``'s streamed reply pauses,
``/health`` answers 503 while no daemon answers, and the reply then completes with the tokens of an
uninterrupted one (failover as in ``generate``: reconnect, replay, continue)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import pytest

from tests.conftest import start_daemon

from .helpers import start_serve, stop_serve

pytestmark = pytest.mark.slow

SPLIT = ("--split", "2:4")


def test_daemon_killed_mid_stream_is_failover(chat_model: Path, tmp_path: Path) -> None:
    address = f"unix:{tmp_path / 'd.sock'}"
    daemons = [start_daemon(chat_model, address, tmp_path / "d0.log", *SPLIT)]
    proc = None
    try:
        proc, url = start_serve(address, chat_model, tmp_path / "serve.log", "--retry-initial", "0.1")
        body = {"model": "tiny", "messages": [{"role": "user", "content": "tell me a story"}],
                "max_tokens": 300, "temperature": 0}
        whole = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300).json()
        want = whole["choices"][0]["message"]["content"]
        assert whole["usage"]["completion_tokens"] > 20, "the reply must last past the kill"
        streamed: list[str] = []
        finish: list[str] = []
        first = threading.Event()

        def read() -> None:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True},
                              timeout=300) as r:
                for line in r.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    ch = json.loads(line[6:])["choices"][0]
                    streamed.append(ch["delta"].get("content") or "")
                    if len(streamed) == 3:
                        first.set()
                    if ch["finish_reason"]:
                        finish.append(ch["finish_reason"])

        reader = threading.Thread(target=read)
        reader.start()
        assert first.wait(120), "no tokens streamed"
        daemons[0].proc.kill()  # type: ignore[union-attr]  # running: started above
        daemons[0].stop()
        assert httpx.get(f"{url}/health", timeout=30).status_code == 503
        daemons.append(start_daemon(chat_model, address, tmp_path / "d1.log", *SPLIT))
        reader.join(300)
        assert not reader.is_alive() and finish, "the streamed reply never finished"
        assert "".join(streamed) == want
        assert httpx.get(f"{url}/health").status_code == 200
        assert "reconnected" in (tmp_path / "serve.log").read_text()
    finally:
        if proc is not None:
            stop_serve(proc)
        for d in daemons:
            d.stop()
