"""P7: the chat app's decode speed against headless ``splitlm generate``, and the app's idle CPU.

    .venv/bin/python scripts/bench_chat.py                      # starts a daemon on the bundled SmolLM2
    .venv/bin/python scripts/bench_chat.py --trunk ADDR         # uses a running daemon
    .venv/bin/python scripts/bench_chat.py --json bench_chat.json --rounds 5

What runs: the same prompt, greedy, the same ``--max-new-tokens``, against the same daemon,
alternating app, headless, app, headless, ... (``--rounds`` pairs), each a fresh process with the
same environment (``OMP_NUM_THREADS=--client-threads``). The app is ``splitlm chat`` in a real
terminal: tmux at 80x24 with ``TERM=xterm-256color`` and no ``COLORTERM``; the prompt is typed
with ``send-keys`` and the app's figures come from its log (``--log-level INFO``: the engine logs
each reply's tokens/s). Headless is ``splitlm generate --json``. Both compute tokens/s the same
way: tokens after the first over their summed latencies (the shared loop's ``per_token_s``, which
includes whatever the front end does per token). The ratio is median(app) / median(headless).
The app runs with a 0.5 ms GIL switch interval (``splitlm.tui.app.launch.SWITCH_INTERVAL_S``) so
its reply worker is not held up while the UI thread redraws; headless keeps Python's 5 ms.

Idle CPU: after the last app reply, the app stays open with its monitor stream on (one sample a
second); psutil reads the app process's CPU time over ``--idle-s`` seconds on the chat screen and
``--server-idle-s`` seconds on the server screen (ctrl+t, its sparklines redrawn per sample).

Needs tmux. Prints a table; ``--json PATH`` also writes the figures. About 2-3 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from _common import start_daemon, stop

PROMPT = "Why is the sky blue?"
REPLY_LINE = re.compile(
    r"reply done: (?P<tokens>\d+) tokens \((?P<finish>\w+)\), (?P<tps>[\d.]+|nan) tok/s, "
    r"TTFT (?P<ttft>[\d.]+|nan) ms"
)


@dataclass(frozen=True)
class Run:
    """One reply: which face, its decode speed, TTFT and token count."""

    face: str
    tokens_per_s: float
    ttft_ms: float
    tokens: int
    finish: str


def client_env(tmp: Path, threads: int) -> dict[str, str]:
    """The same environment for both faces: few threads, passive OpenMP waits, private dirs."""
    env = {k: v for k, v in os.environ.items() if k != "COLORTERM"}
    env.update(
        OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE",
        TERM="xterm-256color", XDG_STATE_HOME=str(tmp / "state"), XDG_DATA_HOME=str(tmp / "data"),
        XDG_CONFIG_HOME=str(tmp / "config"), TOKENIZERS_PARALLELISM="false",
    )
    env.pop("SSH_CONNECTION", None)
    return env


class Tmux:
    """One tmux session on a private server socket (nothing else of the user's is touched)."""

    def __init__(self, tag: str) -> None:
        self.socket = f"splitlm-bench-{os.getpid()}-{tag}"
        self.name = "bench"

    def run(self, *args: str) -> str:
        out = subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True,
                             check=True, timeout=30)
        return out.stdout

    def start(self, command: str, cols: int = 80, rows: int = 24) -> int:
        """Run ``command`` (exec'd, so the pane's pid is the app's) and return that pid."""
        out = self.run("new-session", "-d", "-s", self.name, "-x", str(cols), "-y", str(rows), "-P",
                       "-F", "#{pane_pid}", f"exec {command}")
        return int(out.strip())

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", self.name)

    def keys(self, *keys: str) -> None:
        self.run("send-keys", "-t", self.name, *keys)

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-session", "-t", self.name], capture_output=True,
                       timeout=30)


def wait_for(predicate: Callable[[], Any], what: str, timeout: float, poll_s: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll_s)


def chat_command(args: argparse.Namespace, address: str, data: Path) -> str:
    cmd = [sys.executable, "-m", "splitlm.tui.cli", "--log-level", "INFO", "chat", "--trunk", address,
           "--max-new-tokens", str(args.max_new_tokens), "--data-dir", str(data)]
    if args.model:
        cmd += ["--model", args.model]
    return shlex.join(cmd)


def app_run(args: argparse.Namespace, address: str, tmp: Path, keep: bool = False) -> tuple[Run, Tmux | None, int]:
    """One reply in the app in tmux. With ``keep`` the app stays open (returned with its pid)."""
    env = client_env(tmp, args.client_threads)
    log_file = tmp / "state" / "splitlm" / "log" / "chat.log"
    log_file.unlink(missing_ok=True)
    env_prefix = shlex.join(["env", "-u", "COLORTERM", *[f"{k}={v}" for k, v in sorted(env.items())
                                                          if k in SHARED_ENV]])
    tmux = Tmux(str(time.monotonic_ns()))
    pid = tmux.start(f"{env_prefix} {chat_command(args, address, tmp / 'chats')}")
    try:
        wait_for(lambda: "Type a prompt; Enter sends" in tmux.screen(), "the app to load", 180)
        tmux.keys(args.prompt, "Enter")

        def reply() -> re.Match[str] | None:
            text = log_file.read_text() if log_file.exists() else ""
            return REPLY_LINE.search(text)

        m = wait_for(reply, "the app's reply", 300)
        screen = tmux.screen()
        if "Traceback" in screen:
            raise SystemExit(f"the app failed:\n{screen}")
    except BaseException:
        tmux.close()
        raise
    run = Run("app", float(m["tps"]), float(m["ttft"]), int(m["tokens"]), m["finish"])
    if keep:
        return run, tmux, pid
    quit_app(tmux, pid)
    return run, None, pid


def quit_app(tmux: Tmux, pid: int) -> None:
    """ctrl+q, as a person quits; the session goes once the app has exited."""
    tmux.keys("C-q")
    wait_for(lambda: not pid_alive(pid), "the app to quit", 30)
    tmux.close()


SHARED_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "TERM", "XDG_STATE_HOME",
              "XDG_DATA_HOME", "XDG_CONFIG_HOME", "TOKENIZERS_PARALLELISM", "PATH", "HOME")
"""What the app in tmux inherits (tmux's server has its own environment)."""


def pid_alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def headless_run(args: argparse.Namespace, address: str, tmp: Path) -> Run:
    cmd = [sys.executable, "-m", "splitlm.tui.cli", "generate", "--trunk", address, "--max-new-tokens",
           str(args.max_new_tokens), "--json"]
    if args.model:
        cmd += ["--model", args.model]
    cmd.append(args.prompt)
    out = subprocess.run(cmd, capture_output=True, text=True, env=client_env(tmp, args.client_threads),
                         timeout=600)
    if out.returncode != 0:
        raise SystemExit(f"splitlm generate failed ({out.returncode}):\n{out.stderr}")
    d = json.loads(out.stdout)
    per = d["timings"]["per_token_s"]
    tps = len(per) / sum(per) if per and sum(per) > 0 else float("nan")
    return Run("headless", tps, d["timings"]["ttft_s"] * 1e3, len(d["token_ids"]), d["finish_reason"])


def cpu_percent(pid: int, seconds: float) -> float:
    """The process's (and its threads') CPU time over ``seconds``, in % of one core."""
    import psutil

    p = psutil.Process(pid)
    t0, c0 = time.monotonic(), p.cpu_times()
    time.sleep(seconds)  # measuring an interval: a wait is the measurement itself
    t1, c1 = time.monotonic(), p.cpu_times()
    return 100.0 * ((c1.user - c0.user) + (c1.system - c0.system)) / (t1 - t0)


def idle_cpu(tmux: Tmux, pid: int, chat_s: float, server_s: float) -> dict[str, float]:
    out: dict[str, float] = {}
    time.sleep(2.0)  # let the last reply's redraws settle before the idle window opens
    out["chat_screen"] = cpu_percent(pid, chat_s)
    if server_s > 0:
        tmux.keys("C-t")
        wait_for(lambda: "Server:" in tmux.screen(), "the server screen", 30)
        time.sleep(1.0)
        out["server_screen"] = cpu_percent(pid, server_s)
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trunk", default=None, help="a running daemon (default: start one on --model)")
    p.add_argument("--model", default=None, help="model for a daemon started here (default smollm2)")
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="app/headless pairs, interleaved (default 3)")
    p.add_argument("--client-threads", type=int, default=1, help="OMP_NUM_THREADS of both faces (default 1)")
    p.add_argument("--daemon-threads", type=int, default=1, help="--threads of a daemon started here")
    p.add_argument("--idle-s", type=float, default=30.0, help="idle CPU window on the chat screen")
    p.add_argument("--server-idle-s", type=float, default=10.0, help="idle CPU window on the server screen (0: skip)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the figures here")
    args = p.parse_args()
    if shutil.which("tmux") is None:
        raise SystemExit("tmux is needed (the app runs in a real terminal): apt-get install tmux")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-chat-") as t:
        tmp = Path(t)
        address = args.trunk or f"unix:{tmp / 'trunk.sock'}"
        proc = None if args.trunk else start_daemon(args.model or "smollm2", address, tmp / "trunkd.log",
                                                    "--threads", str(args.daemon_threads), poll_s=0.3)
        runs: list[Run] = []
        idle: dict[str, float] = {}
        try:
            headless_run(args, address, tmp)  # warms the page cache and the daemon: not counted
            for i in range(args.rounds):
                last = i == args.rounds - 1
                run, tmux, pid = app_run(args, address, tmp, keep=last)
                runs.append(run)
                print(f"round {i + 1}: app {run.tokens_per_s:.2f} tok/s", end="", flush=True)
                if tmux is not None:
                    try:
                        idle = idle_cpu(tmux, pid, args.idle_s, args.server_idle_s)
                    finally:
                        quit_app(tmux, pid)
                h = headless_run(args, address, tmp)
                runs.append(h)
                print(f", headless {h.tokens_per_s:.2f} tok/s", flush=True)
        finally:
            stop(proc, timeout_s=60)
    report(args, address, runs, idle, time.monotonic() - started)


def report(args: argparse.Namespace, address: str, runs: list[Run], idle: dict[str, float], wall_s: float) -> None:
    app = [r for r in runs if r.face == "app"]
    head = [r for r in runs if r.face == "headless"]
    app_tps, head_tps = median([r.tokens_per_s for r in app]), median([r.tokens_per_s for r in head])
    summary: dict[str, Any] = {
        "prompt": args.prompt, "max_new_tokens": args.max_new_tokens, "rounds": args.rounds,
        "client_threads": args.client_threads, "trunk": address if args.trunk else "started here",
        "runs": [asdict(r) for r in runs],
        "app_tokens_per_s_median": app_tps, "headless_tokens_per_s_median": head_tps,
        "app_over_headless": app_tps / head_tps if head_tps else float("nan"),
        "app_ttft_ms_median": median([r.ttft_ms for r in app]),
        "headless_ttft_ms_median": median([r.ttft_ms for r in head]),
        "same_token_count": len({r.tokens for r in runs}) == 1,
        "idle_cpu_percent_of_one_core": idle, "idle_window_s": {"chat_screen": args.idle_s,
                                                                "server_screen": args.server_idle_s},
        "wall_s": wall_s,
    }
    print()
    print(f"{'':28}{'app (tmux 80x24)':>18}{'headless':>12}{'app/headless':>14}")
    print(f"{'tokens/s, median':28}{app_tps:18.2f}{head_tps:12.2f}{summary['app_over_headless']:14.3f}")
    print(f"{'TTFT ms, median':28}{summary['app_ttft_ms_median']:18.1f}{summary['headless_ttft_ms_median']:12.1f}")
    print(f"{'tokens per reply':28}{'/'.join(str(r.tokens) for r in app):>18}"
          f"{'/'.join(str(r.tokens) for r in head):>12}")
    for where, pct in idle.items():
        window = summary["idle_window_s"][where]
        print(f"{'idle CPU, ' + where.replace('_', ' '):28}{pct:17.2f}%  (% of one core over {window:.0f} s)")
    print(f"({args.rounds} interleaved rounds, {wall_s:.0f} s in all)")
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
