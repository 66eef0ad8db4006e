"""Screenshots of the chat app's main screens for docs/ (SVG via ``App.save_screenshot``), and
optionally of ``splitlm chat --serve`` in headless Chromium (PNG).

    .venv/bin/python scripts/screenshots.py                  # starts a daemon on the bundled SmolLM2
    .venv/bin/python scripts/screenshots.py --trunk ADDR     # uses a running daemon
    .venv/bin/python scripts/screenshots.py --browser        # also docs/browser.png (needs chromium)

The app runs headless (Textual's test driver) against the real daemon: a real reply, real
latency figures, real monitor samples.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import start_daemon, stop

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Why is the sky blue?"


async def shoot(address: str, out: Path, size: tuple[int, int], data_dir: Path) -> None:
    from textual.widgets import Input

    from splitlm.tui.app.app import SplitlmApp
    from splitlm.tui.app.config import AppConfig, ChatSettings

    config = AppConfig(trunk=address, data_dir=data_dir, log_file=data_dir / "chat.log", animations=False,
                       settings=ChatSettings(max_new_tokens=96, draft="ngram"))
    app = SplitlmApp(config)

    async def until(pred, what: str, timeout: float = 300) -> None:  # type: ignore[no-untyped-def]
        end = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > end:
                raise SystemExit(f"timed out waiting for {what}")
            await pilot.pause(0.1)

    async with app.run_test(size=size) as pilot:
        chat = app.chat_screen()
        await until(lambda: app.engine.loaded and not chat.starting, "the model")
        chat.query_one("#prompt", Input).focus()
        await pilot.press(*PROMPT, "enter")
        await until(lambda: len(chat.messages) == 2 and not chat.generating, "the reply")
        await until(lambda: app.monitor_samples >= 3, "monitor samples")
        await pilot.pause(0.5)
        app.save_screenshot(str(out / "chat.svg"))
        await pilot.press("ctrl+l")
        await pilot.pause(0.5)
        app.save_screenshot(str(out / "latency.svg"))
        await pilot.press("ctrl+t")
        await pilot.pause(2.5)
        app.save_screenshot(str(out / "server.svg"))
        await pilot.press("ctrl+f")
        await pilot.pause(0.3)
        await pilot.press("enter")
        screen = app.screen
        await until(lambda: getattr(screen, "report", None) is not None, "the comparison", 600)
        await pilot.pause(0.3)
        app.save_screenshot(str(out / "compare.svg"))
        await pilot.press("escape")
        await pilot.press("ctrl+s")
        await pilot.pause(0.3)
        app.save_screenshot(str(out / "settings.svg"))
        await pilot.press("escape")
    print(f"wrote {', '.join(p.name for p in sorted(out.glob('*.svg')))} to {out}")


async def browser_screenshot(url: str, png: Path, wait_s: float = 20.0) -> None:
    """Load ``url`` in headless Chromium (Chrome DevTools protocol over aiohttp, which
    textual-serve already needs) and save a screenshot once the app has drawn."""
    import aiohttp

    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        raise SystemExit("no chromium here (Debian: apt-get install chromium)")
    port = 9333
    profile = tempfile.mkdtemp()
    proc = subprocess.Popen(
        [chromium, "--headless", "--no-sandbox", "--enable-unsafe-swiftshader", "--hide-scrollbars",
         f"--remote-debugging-port={port}", f"--user-data-dir={profile}", "--window-size=1100,720", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        async with aiohttp.ClientSession() as http:
            targets = None
            for _ in range(200):
                try:
                    async with http.get(f"http://127.0.0.1:{port}/json") as r:
                        targets = await r.json()
                        break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
            assert targets, "chromium did not start"
            page = next(t for t in targets if t["type"] == "page")
            async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                ids = iter(range(1, 10**6))

                async def cmd(method: str, **params: object) -> dict:
                    mid = next(ids)
                    await ws.send_json({"id": mid, "method": method, "params": params})
                    while True:
                        m = await ws.receive_json()
                        if m.get("id") == mid:
                            return m.get("result", {})

                await cmd("Page.enable")
                await cmd("Emulation.setFocusEmulationEnabled", enabled=True)  # Textual redraws keys on focus
                await cmd("Page.navigate", url=url)
                await asyncio.sleep(wait_s)
                shot = await cmd("Page.captureScreenshot", format="png")
                png.write_bytes(base64.b64decode(shot["data"]))
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(profile, ignore_errors=True)
    print(f"wrote {png}")


def browser(address: str, out: Path, data_dir: Path) -> None:
    port = 8765
    env = dict(os.environ, XDG_STATE_HOME=str(data_dir / "state"))
    server = subprocess.Popen(
        [sys.executable, "-m", "splitlm.tui.cli", "chat", "--serve", "--port", str(port), "--trunk", address,
         "--data-dir", str(data_dir / "web"), "--no-animation"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )
    try:
        time.sleep(3)
        asyncio.run(browser_screenshot(f"http://localhost:{port}", out / "browser.png"))
    finally:
        server.terminate()
        server.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trunk", default=None, help="a running daemon (default: start one on smollm2)")
    p.add_argument("--out", type=Path, default=ROOT / "docs")
    p.add_argument("--size", default="100x30", help="terminal size COLSxROWS")
    p.add_argument("--browser", action="store_true", help="also docs/browser.png through textual-serve")
    args = p.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args.out.mkdir(parents=True, exist_ok=True)
    cols, rows = (int(x) for x in args.size.split("x"))
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        address = args.trunk or f"unix:{tmp / 'trunk.sock'}"
        proc = None if args.trunk else start_daemon("smollm2", address, tmp / "trunkd.log", "--threads", "1",
                                                    poll_s=0.3)
        try:
            asyncio.run(shoot(address, args.out, (cols, rows), tmp / "data"))
            if args.browser:
                browser(address, args.out, tmp)
        finally:
            stop(proc, timeout_s=None)


if __name__ == "__main__":
    main()
