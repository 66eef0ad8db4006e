"""Aggregate trunk decode throughput with cross-session batching on vs off.

Starts two daemons on the same model (``--batch`` and not), then, alternating between them, runs
N = 1, 2, 4, 8 concurrent sessions that each prefill a prompt and send one-position decode steps
(random hidden states: this measures the daemon, not the client's bottom and top). Prints, per N
and mode, the median over repetitions of the aggregate steps per second, and the ratio on/off.

``--engine`` measures instead, in this process without gRPC, one batched decode step of N rows
(``Part.forward_rows``) against N solo steps (``Part.forward``) on the default trunk, interleaved,
in wall and thread CPU time: the CPU time is the figure that least depends on other load.

    .venv/bin/python scripts/bench_batching.py [--model smollm2] [--steps 16] [--reps 3] [--engine]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from _common import start_daemon, stop

from splitlm.shared.client import TrunkClient
from splitlm.shared.plan import Fingerprint


def run(address: str, sessions: int, prompt: int, steps: int) -> float:
    """Aggregate decode steps per second of ``sessions`` concurrent sessions."""
    client = TrunkClient(address)
    plan = client.info().plan
    fp = Fingerprint(plan.config_digest, plan.weights_digest, plan.trunk_start, plan.trunk_end)
    opened = [client.open_session(fp, torch.float32) for _ in range(sessions)]
    for s in opened:
        s.step(torch.randn(1, prompt, plan.hidden_size), 0)
    barrier = threading.Barrier(sessions + 1)

    def decode(s) -> None:  # type: ignore[no-untyped-def]
        x = torch.randn(1, 1, plan.hidden_size)
        barrier.wait()
        for i in range(steps):
            s.step(x, prompt + i)

    threads = [threading.Thread(target=decode, args=(s,)) for s in opened]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    for s in opened:
        s.close()
    client.close()
    return sessions * steps / elapsed


def engine(model: str, counts: list[int], prompt: int, reps: int) -> dict[str, dict[int, list[float]]]:
    """Per mode (``solo``/``batch``, wall and CPU) and N: seconds of N decode steps, every rep."""
    from splitlm.shared.models import PartSpec, build_part, family_for, resolve
    from splitlm.shared.plan import default_split

    src = resolve(model)
    n = src.config.num_hidden_layers
    start, end = default_split(n, str(src.config.model_type))
    part = build_part(src, family_for(src.config), PartSpec.trunk(start, end), torch.float32, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    caches = [part.new_cache() for _ in range(max(counts))]
    for c in caches:
        part.forward(torch.randn(1, prompt, part.hidden_size, generator=g), 0, c)
    xs = [torch.randn(1, 1, part.hidden_size, generator=g) for _ in caches]
    out: dict[str, dict[int, list[float]]] = {m: {k: [] for k in counts} for m in
                                              ("solo wall", "batch wall", "solo cpu", "batch cpu")}
    for _ in range(reps):
        for k in counts:
            for mode in ("solo", "batch"):  # interleaved
                w0, c0 = time.perf_counter(), time.thread_time()
                if mode == "solo" or k == 1:
                    for x, c in zip(xs[:k], caches[:k]):
                        part.forward(x, prompt, c)
                else:
                    for x, c in zip(xs[:k], caches[:k]):
                        part.begin_step(x, prompt, c)  # back to the prompt: every rep at one length
                    part.forward_rows(xs[:k], [prompt] * k, caches[:k])
                out[f"{mode} wall"][k].append(time.perf_counter() - w0)
                out[f"{mode} cpu"][k].append(time.thread_time() - c0)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--sessions", default="1,2,4,8")
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", default="1", help="daemon torch threads")
    p.add_argument("--windows", default="0", help="--batch-window values to compare, e.g. 0,2ms")
    p.add_argument("--json", default=None, metavar="PATH")
    p.add_argument("--engine", action="store_true", help="batched vs solo trunk steps in-process")
    args = p.parse_args()
    torch.set_num_threads(1)
    counts = [int(n) for n in args.sessions.split(",")]
    if args.engine:
        times = engine(args.model, counts, args.prompt, max(args.reps, 5))
        med = {m: {k: statistics.median(v) * 1e3 for k, v in r.items()} for m, r in times.items()}
        print("ms for N decode steps of the trunk (median, interleaved); solo/batch: what batching saves")
        print(f"{'N':>3} {'solo wall':>10} {'batch wall':>11} {'ratio':>6} {'solo cpu':>9} {'batch cpu':>10} {'ratio':>6}")
        for k in counts:
            sw, bw, sc, bc = (med[m][k] for m in ("solo wall", "batch wall", "solo cpu", "batch cpu"))
            print(f"{k:>3} {sw:>10.1f} {bw:>11.1f} {sw / bw:>6.2f} {sc:>9.1f} {bc:>10.1f} {sc / bc:>6.2f}")
        if args.json:
            Path(args.json).write_text(json.dumps({"engine_ms": med}, indent=2))
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="bench-batching-"))
    common = ["--threads", args.threads, "--idle-timeout", "0"]
    procs = {"off": start_daemon(args.model, f"unix:{tmp / 'off.sock'}", tmp / "off.log", *common)}
    for w in args.windows.split(","):
        procs[f"on:{w}"] = start_daemon(
            args.model, f"unix:{tmp / f'on-{w}.sock'}", tmp / f"on-{w}.log", *common, "--batch", "--batch-window", w
        )
    results: dict[str, dict[int, list[float]]] = {m: {n: [] for n in counts} for m in procs}
    try:
        for _ in range(args.reps):
            for n in counts:
                for mode in procs:  # interleaved: every mode sees the same machine load
                    sock = tmp / f"{mode.replace(':', '-')}.sock"
                    results[mode][n].append(run(f"unix:{sock}", n, args.prompt, args.steps))
    finally:
        stop(*procs.values())
    med = {m: {n: statistics.median(v) for n, v in r.items()} for m, r in results.items()}
    print("aggregate decode steps/s (median of runs); in brackets: x one session of the same mode")
    print(f"{'sessions':>8} " + " ".join(f"{m:>18}" for m in procs))
    for n in counts:
        cells = [f"{med[m][n]:>9.1f} [{med[m][n] / med[m][counts[0]]:>5.2f}x]" for m in procs]
        print(f"{n:>8} " + " ".join(f"{c:>18}" for c in cells))
    if args.json:
        Path(args.json).write_text(json.dumps({"median_tokens_per_s": med, "runs": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
