"""``make demo`` (scripts/demo.sh): a daemon, a printed split reply, then the chat app at a
terminal. Without a terminal it must print the reply and exit, never wait for keys.

The tiny chat model stands in for SmolLM2 (``DEMO_MODEL``) so the script's own logic is what is
timed; the SmolLM2 path itself is covered by the real-model tests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tui.test_terminal import Tmux

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "scripts" / "demo.sh"


def demo_env(chat_model: Path, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "COLORTERM"}
    env.update(
        VENV=sys.prefix, DEMO_MODEL=str(chat_model), TERM="xterm-256color", OMP_NUM_THREADS="1",
        XDG_STATE_HOME=str(tmp_path / "state"), XDG_DATA_HOME=str(tmp_path / "data"),
        XDG_CONFIG_HOME=str(tmp_path / "config"),
    )
    return env


def test_demo_without_a_terminal_prints_a_reply_and_exits(chat_model: Path, tmp_path: Path) -> None:
    r = subprocess.run(["bash", str(DEMO)], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       env=demo_env(chat_model, tmp_path), timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "fingerprint" in out and "splitlm generate" in out  # `splitlm info`, then the command
    reply = out.split('"Why is the sky blue?"', 1)[1].split("(no terminal here", 1)[0].strip()
    assert reply, out  # the split reply was printed
    assert "no terminal here" in out and "Traceback" not in out + r.stderr


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (CI installs it: .ci/run)")
def test_demo_at_a_terminal_opens_the_chat_then_stops_the_daemon(chat_model: Path, tmp_path: Path) -> None:
    import psutil

    env = demo_env(chat_model, tmp_path)
    tmux = Tmux(f"splitlm-demo-{os.getpid()}")
    keep = ("VENV", "DEMO_MODEL", "TERM", "OMP_NUM_THREADS", "PATH", "HOME", "XDG_STATE_HOME",
            "XDG_DATA_HOME", "XDG_CONFIG_HOME")
    assigns = " ".join(f"{k}={env[k]}" for k in keep)
    tmux.run("new-session", "-d", "-s", tmux.name, "-x", "80", "-y", "24",
             f"env -u COLORTERM {assigns} bash {DEMO}; echo DEMO EXITED $?; sleep 60")
    try:
        tmux.wait_for(lambda s: "connected" in s and "Type a prompt; Enter sends" in s, "the chat app", 180)
        daemons = [p for p in psutil.process_iter(["cmdline"])
                   if any("splitlm-trunkd" in a for a in p.info["cmdline"] or ())
                   and str(chat_model) in (p.info["cmdline"] or ())]
        assert daemons, "the demo's daemon is not running"
        tmux.keys("why is the sky blue", "Enter")
        tmux.wait_for(lambda s: "tok/s" in s and "TTFT" in s and "^n New" in s, "the reply")
        tmux.keys("C-q")
        screen = tmux.wait_for(lambda s: "DEMO EXITED" in s, "the demo to end", 60)
        assert "DEMO EXITED 0" in screen and "Traceback" not in screen
        _, alive = psutil.wait_procs(daemons, timeout=30)
        assert not alive, "the demo left its daemon running"
    finally:
        subprocess.run(["tmux", "kill-session", "-t", tmux.name], capture_output=True, timeout=30)
