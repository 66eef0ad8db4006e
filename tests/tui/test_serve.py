"""``splitlm chat --serve``: textual-serve serves the same app to a browser.

The page and its websocket are checked here; a headless Chromium screenshot of it is made by
``scripts/screenshots.py --browser`` (docs/browser.png) when Chromium is installed.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import free_port


def test_serve_runs_the_app_behind_a_websocket(chat_daemon, chat_model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    aiohttp = pytest.importorskip("aiohttp")
    port = free_port()
    env = dict(os.environ, XDG_STATE_HOME=str(tmp_path / "state"))
    server = subprocess.Popen(
        [sys.executable, "-m", "splitlm.tui.cli", "chat", "--serve", "--port", str(port), "--trunk",
         chat_daemon.address, "--model", str(chat_model), "--data-dir", str(tmp_path / "data")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
    )

    async def check() -> str:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 60
            while True:
                try:
                    async with http.get(f"http://localhost:{port}/") as r:
                        page = await r.text()
                        break
                except aiohttp.ClientError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise
                    await asyncio.sleep(0.2)
            assert "splitlm chat" in page and "textual.js" in page
            # what the browser's terminal does: open the websocket, say its size, read the screen
            received = ""
            async with http.ws_connect(f"ws://localhost:{port}/ws") as ws:
                await ws.send_json(["resize", {"width": 80, "height": 24}])
                deadline = time.monotonic() + 90
                while "connected" not in received or "Type a prompt" not in received:
                    assert time.monotonic() < deadline, f"the app did not draw in time: {received[-2000:]!r}"
                    msg = await ws.receive(timeout=90)
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        received += msg.data.decode("utf-8", "replace")
                    elif msg.type == aiohttp.WSMsgType.TEXT:
                        received += msg.data
                    else:
                        break
            return received

    try:
        screen = asyncio.run(check())
    finally:
        server.terminate()
        out = server.communicate(timeout=30)[0].decode(errors="replace")
    assert "splitlm" in screen and "Traceback" not in out
