"""A real terminal: tmux runs ``splitlm chat`` at 80x24 with TERM=xterm-256color and no COLORTERM
(as over SSH); keys go in with send-keys, the screen comes back with capture-pane."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (CI installs it: .ci/run)")


class Tmux:
    def __init__(self, name: str) -> None:
        self.name = name

    def run(self, *args: str) -> str:
        return subprocess.run(["tmux", *args], capture_output=True, text=True, check=True, timeout=30).stdout

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", self.name)

    def keys(self, *keys: str) -> None:
        self.run("send-keys", "-t", self.name, *keys)

    def wait_for(self, predicate: Callable[[str], bool], what: str, timeout: float = 90) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen()
            if predicate(text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; the screen:\n{text}")
            time.sleep(0.2)


@pytest.fixture
def tmux(tmp_path) -> Iterator[Tmux]:  # type: ignore[no-untyped-def]
    t = Tmux(f"splitlm-test-{uuid.uuid4().hex[:8]}")
    yield t
    subprocess.run(["tmux", "kill-session", "-t", t.name], capture_output=True, timeout=30)


def replied(screen: str, tokens: int) -> bool:
    """The reply has finished: its header carries the count (the live latency line shows it sooner)."""
    return any("assistant" in line and f"· {tokens} tok" in line for line in screen.splitlines())


def start_chat(tmux: Tmux, address: str, model: object, tmp_path, max_new_tokens: int = 24,  # type: ignore[no-untyped-def]
               cache_dir: object = None) -> None:
    """Run ``splitlm chat`` in the tmux session at 80x24, without COLORTERM, logging to tmp_path;
    ``cache_dir``: its model cache (unset: the tmux server's environment's)."""
    cmd = shlex.join([
        sys.executable, "-m", "splitlm.tui.cli", "--log-level", "INFO", "chat", "--trunk", address,
        "--model", str(model), "--max-new-tokens", str(max_new_tokens), "--data-dir", str(tmp_path / "data"),
    ])
    env = {k: v for k, v in os.environ.items() if k != "COLORTERM"}
    env.update(TERM="xterm-256color", XDG_STATE_HOME=str(tmp_path / "state"), OMP_NUM_THREADS="1")
    if cache_dir is not None:
        env["SPLITLM_CACHE_DIR"] = str(cache_dir)
    env_args = ["env", "-u", "COLORTERM", *[f"{k}={v}" for k, v in env.items() if k in
                                             ("TERM", "XDG_STATE_HOME", "OMP_NUM_THREADS", "PATH", "HOME",
                                              "SPLITLM_CACHE_DIR")]]
    tmux.run("new-session", "-d", "-s", tmux.name, "-x", "80", "-y", "24",
             shlex.join(env_args) + f" {cmd}; echo EXITED $?; sleep 60")


def test_chat_in_tmux_80x24(tmux, chat_daemon, chat_model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    start_chat(tmux, chat_daemon.address, chat_model, tmp_path)
    tmux.wait_for(lambda s: "connected" in s and "Type a prompt" in s, "the app to connect")
    tmux.keys("why is the sky blue", "Enter")
    screen = tmux.wait_for(lambda s: "24 tok" in s and "TTFT" in s and "^n New" in s, "the reply")
    lines = screen.splitlines()
    assert len(lines) <= 24 and max(len(x) for x in lines) <= 80
    assert any(line.strip() == "why is the sky blue" for line in lines)  # the prompt
    assert any("assistant" in line and "tok/s" in line for line in lines)  # the reply's figures
    assert any(line.lstrip().startswith("latency") and "p50" in line for line in lines)  # live line
    tmux.keys("C-l")
    screen = tmux.wait_for(lambda s: "p95 / token" in s, "the latency screen")
    assert "own machine" in screen and "trunk" in screen and "wire" in screen and "bytes/token" in screen
    tmux.keys("C-q")
    tmux.wait_for(lambda s: "EXITED 0" in s, "a clean exit", timeout=30)
    assert "Traceback" not in tmux.screen()
    assert (tmp_path / "state" / "splitlm" / "log" / "chat.log").exists()  # logs went to the file


def test_prompt_typed_at_start_is_answered_without_a_second_enter(tmux, chat_daemon, chat_model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Type a prompt and press Enter the moment the command starts, before the app has drawn
    anything (it still imports torch) and while it loads the model: the prompt is held, shown as
    waiting, and answered when the parts are ready, with no second Enter."""
    start_chat(tmux, chat_daemon.address, chat_model, tmp_path)
    tmux.keys("why is the sky blue", "Enter")  # once; nothing else is pressed until the reply
    seen: list[str] = []
    screen = tmux.wait_for(lambda s: seen.append(s) or replied(s, 24), "the reply")
    assert any("loading (" in s and "/5)" in s for s in seen), "the status bar never showed the load"
    assert not any("not connected" in s.lower() for s in seen)
    lines = [line.strip() for line in screen.splitlines()]
    assert lines.count("why is the sky blue") == 1  # the keys reached the prompt: sent once, shown once
    assert "waiting for the model" not in screen and "● connected" in screen
    log = (tmp_path / "state" / "splitlm" / "log" / "chat.log").read_text()
    assert "holding a prompt of 19 characters" in log, log  # held while loading, not sent into a ready app
    assert log.index("holding a prompt") < log.index("load 5/5") < log.index("reply done: 24 tokens")
    tmux.keys("C-q")
    tmux.wait_for(lambda s: "EXITED 0" in s, "a clean exit", timeout=60)
    assert "Traceback" not in tmux.screen()


def test_prompt_held_while_loading_shows_as_waiting(tmux, chat_daemon, chat_model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Enter once the app shows it is loading: the prompt is marked as waiting, then answered."""
    start_chat(tmux, chat_daemon.address, chat_model, tmp_path)
    tmux.wait_for(lambda s: "loading (" in s, "the app's first screen", timeout=90)
    tmux.keys("why is the sky blue", "Enter")
    held = tmux.wait_for(lambda s: "waiting for the model" in s or "TTFT" in s, "the held prompt")
    assert "waiting for the model" in held and "esc Take back" in held, held
    screen = tmux.wait_for(lambda s: replied(s, 24), "the reply")
    assert [line.strip() for line in screen.splitlines()].count("why is the sky blue") == 1
    tmux.keys("C-q")
    tmux.wait_for(lambda s: "EXITED 0" in s, "a clean exit", timeout=60)


@pytest.mark.realmodel
@pytest.mark.slow
def test_smollm2_start_keeps_the_first_prompt_and_quits_mid_load(tmux, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The bundled SmolLM2, whose parts take 15-60 s to load here: a prompt typed at once is
    answered without a second Enter, and ctrl+q in the middle of a load quits at once."""
    from tests.conftest import start_daemon

    d = start_daemon("smollm2", f"unix:{tmp_path / 'trunk.sock'}", tmp_path / "trunkd.log")
    try:
        start_chat(tmux, d.address, "smollm2", tmp_path, max_new_tokens=8)
        t0 = time.monotonic()
        tmux.keys("Why is the sky blue?", "Enter")
        seen: list[str] = []
        screen = tmux.wait_for(lambda s: seen.append(s) or replied(s, 8), "the reply", timeout=240)
        assert any("waiting for the model" in s for s in seen)  # a 15-60 s load is seen holding it
        assert any("loading (3/5)" in s and "top [28, 30) weights" in s for s in seen)
        assert [line.strip() for line in screen.splitlines()].count("Why is the sky blue?") == 1
        log = (tmp_path / "state" / "splitlm" / "log" / "chat.log").read_text()
        assert "holding a prompt" in log and "reply done: 8 tokens" in log, log[-2000:]
        print(f"start to reply: {time.monotonic() - t0:.1f} s")  # shown with -s
        tmux.keys("C-q")
        tmux.wait_for(lambda s: "EXITED 0" in s, "a clean exit", timeout=30)

        tmux.run("kill-session", "-t", tmux.name)
        # a cold model cache: the GGUF is read and converted again (seconds), so the load is
        # still in its GGUF stage when the screen shows it; from a warm cache the load can end
        # between two looks at the screen
        start_chat(tmux, d.address, "smollm2", tmp_path, max_new_tokens=8, cache_dir=tmp_path / "cold-cache")
        tmux.wait_for(lambda s: "reading the model" in s, "the load's GGUF stage", timeout=120)
        tmux.keys("C-q")
        t_quit = time.monotonic()
        tmux.wait_for(lambda s: "EXITED 0" in s, "a quick exit mid-load", timeout=30)
        assert time.monotonic() - t_quit < 8, "ctrl+q waited for the load"
        assert "Traceback" not in tmux.screen()
    finally:
        d.stop()


def test_terminal_modes_come_back_after_a_refused_start(tmux, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The chat turns echo and line editing off at once (keys typed at start wait for the app);
    a start refused for a bad flag must hand the shell its terminal back as it was."""
    cmd = shlex.join([sys.executable, "-m", "splitlm.tui.cli", "chat", "--trunk", f"unix:{tmp_path / 'none.sock'}",
                      "--temperature", "-1", "--data-dir", str(tmp_path / "data")])
    modes = "stty -a | tr ' ;' '\\n\\n' | grep -xE -- '-?(echo|icanon|icrnl)' | sort | tr '\\n' ' '"
    tmux.run("new-session", "-d", "-s", tmux.name, "-x", "120", "-y", "24",
             f"echo BEFORE $({modes}); {cmd}; echo EXITED $?; echo AFTER $({modes}); sleep 60")
    screen = tmux.wait_for(lambda s: "AFTER" in s, "the refused start", timeout=60)
    before = next(line for line in screen.splitlines() if line.startswith("BEFORE")).split()[1:]
    after = next(line for line in screen.splitlines() if line.startswith("AFTER")).split()[1:]
    assert before == ["echo", "icanon", "icrnl"] and after == before, screen
    assert "EXITED 2" in screen and "--temperature" in screen
