"""Start time: process start to first token (or to serving), with a cold and a warm model cache.

Measures, each as a fresh process (``runs`` times, the median reported, and the median ratio to
an ``import torch, transformers`` timed just before each run):

- ``import torch, transformers``: the baseline the goal is stated against (start <= 2x it);
- ``generate --full``: ``splitlm generate --full --max-new-tokens 8 Hi`` to its first output byte;
- ``generate``: the same, split, against a daemon already serving (warm);
- ``daemon``: ``splitlm-trunkd`` start to its first answered ``Info``;
- ``chat``: ``splitlm chat`` (in a pseudo-terminal) to its engine's "engine ready" log line.

Cold runs each get an empty cache dir (``SPLITLM_CACHE_DIR``); warm runs share one the first run
filled. Prints a table and writes JSON (``--json``). ``--quick`` (one run each, warm rows only,
no chat) is what the smoke test runs, on a tiny model.

    python scripts/bench_start.py [--model smollm2] [--runs 3] [--json docs/bench/start.json]
"""

from __future__ import annotations

import argparse
import json
import os
import pty
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _common import stop

from splitlm.shared.launcher import DaemonStartError, OwnedDaemon

PROMPT = "Hi"


def _env(cache: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, SPLITLM_CACHE_DIR=str(cache), OMP_WAIT_POLICY="PASSIVE", **extra)
    env.pop("SPLITLM_NO_CACHE", None)
    return env


def time_import() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, transformers"], check=True)
    return time.perf_counter() - t0


def time_first_byte(cmd: list[str], env: dict[str, str]) -> float:
    """Seconds from starting ``cmd`` to the first byte on its stdout (the first token streamed)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    assert proc.stdout is not None
    first = proc.stdout.read(1)
    elapsed = time.perf_counter() - t0
    out, err = proc.communicate(timeout=600)
    if proc.returncode != 0 or not first:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {err.decode()[-2000:]}")
    return elapsed


def time_daemon(model: str, address: str, env: dict[str, str], keep: bool = False) -> tuple[float, OwnedDaemon]:
    """Seconds from starting the daemon to its first answered ``Info`` (polled every 20 ms); the
    daemon (stopped unless ``keep``)."""
    daemon = OwnedDaemon(["--model", model], address=address, env=env, name="the daemon")
    t0 = time.perf_counter()
    daemon.spawn()
    try:
        daemon.wait_ready(600, poll_s=0.02)
    except DaemonStartError as e:
        raise SystemExit(str(e)) from None
    elapsed = time.perf_counter() - t0
    if not keep:
        stop(daemon)
    return elapsed, daemon


def time_chat(address: str, env: dict[str, str], state: Path) -> float:
    """Seconds from starting ``splitlm chat`` in a pseudo-terminal to its "engine ready" log line."""
    shutil.rmtree(state, ignore_errors=True)  # a fresh log: an old "engine ready" must not count
    state.mkdir(parents=True)
    master, slave = pty.openpty()
    chat_env = dict(env, XDG_STATE_HOME=str(state), TERM="xterm-256color", COLUMNS="100", LINES="30")
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "splitlm.tui.cli", "--log-level", "INFO", "chat", "--trunk", address],
        env=chat_env, stdin=slave, stdout=slave, stderr=slave, close_fds=True,
    )
    os.close(slave)
    try:
        while True:
            try:
                os.read(master, 65536)  # keep the terminal drained
            except OSError:
                pass
            logs = list(state.rglob("*.log"))
            if any("engine ready" in p.read_text(errors="replace") for p in logs):
                return time.perf_counter() - t0
            if proc.poll() is not None or time.perf_counter() - t0 > 600:
                raise SystemExit(f"chat exited ({proc.poll()}) or never got ready; logs: {logs}")
            time.sleep(0.02)
    finally:
        proc.terminate()
        proc.wait(30)
        os.close(master)


def measure(runs: int, fn: Callable[[], float]) -> dict[str, float | list[float]]:
    """``runs`` timings of ``fn``, each right after a timing of the import baseline.

    The machine's load drifts (other work shares its two cores), so each run is compared with the
    baseline taken next to it; ``ratio`` is the median of those pairwise ratios.
    """
    pairs = [(time_import(), fn()) for _ in range(runs)]
    return {
        "median_s": statistics.median(v for _, v in pairs),
        "import_median_s": statistics.median(b for b, _ in pairs),
        "ratio": statistics.median(v / b for b, v in pairs),
        "runs_s": [v for _, v in pairs],
        "import_runs_s": [b for b, _ in pairs],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    ap.add_argument("--quick", action="store_true", help="one run each, warm only, no chat (the smoke test)")
    ap.add_argument("--no-chat", action="store_true")
    args = ap.parse_args()
    runs = 1 if args.quick else args.runs
    cli = [sys.executable, "-m", "splitlm.tui.cli"]
    gen = ["generate", "--max-new-tokens", "8", "--model", args.model, PROMPT]
    root = Path(tempfile.mkdtemp(prefix="bench-start-"))
    results: dict[str, dict[str, float | list[float]]] = {}
    daemon = None
    try:
        warm = root / "warm"
        address = f"unix:{root / 'trunk.sock'}"

        def cold_dir() -> Path:
            return Path(tempfile.mkdtemp(dir=root, prefix="cold-"))

        baseline = [time_import() for _ in range(runs)]
        results["import torch, transformers"] = {"median_s": statistics.median(baseline), "ratio": 1.0, "runs_s": baseline}
        if not args.quick:
            results["generate --full, cold"] = measure(
                runs, lambda: time_first_byte([*cli, *gen, "--full"], _env(cold_dir()))
            )
        time_first_byte([*cli, *gen, "--full"], _env(warm))  # fills the warm cache
        results["generate --full, warm"] = measure(runs, lambda: time_first_byte([*cli, *gen, "--full"], _env(warm)))
        if not args.quick:
            results["daemon to serving, cold"] = measure(
                runs, lambda: time_daemon(args.model, address, _env(cold_dir()))[0]
            )
        results["daemon to serving, warm"] = measure(runs, lambda: time_daemon(args.model, address, _env(warm))[0])
        _, daemon = time_daemon(args.model, address, _env(warm), keep=True)
        split = [*cli, *gen, "--trunk", address]
        if not args.quick:
            results["generate, cold"] = measure(runs, lambda: time_first_byte(split, _env(cold_dir())))
        results["generate, warm"] = measure(runs, lambda: time_first_byte(split, _env(warm)))
        if not (args.quick or args.no_chat):
            state = root / "state"
            results["chat to ready, cold"] = measure(runs, lambda: time_chat(address, _env(cold_dir()), state))
            results["chat to ready, warm"] = measure(runs, lambda: time_chat(address, _env(warm), state))
    finally:
        stop(daemon)
        shutil.rmtree(root, ignore_errors=True)
    print(f"{'start':<28} {'median s':>9} {'import s':>9} {'x import':>9}")
    for name, r in results.items():
        med, ratio = float(r["median_s"]), float(r["ratio"])  # type: ignore[arg-type]
        base = float(r.get("import_median_s", med))  # type: ignore[arg-type]
        print(f"{name:<28} {med:>9.2f} {base:>9.2f} {ratio:>9.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": args.model, "runs": runs, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
