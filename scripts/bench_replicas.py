"""Replica sets measured: how gRPC's round_robin spreads sessions over replicas, tokens/s of many
concurrent sessions on 1 replica vs 3, and how long a session takes to move after its replica is
killed -9.

    .venv/bin/python scripts/bench_replicas.py --model smollm2 --sessions 12 --tokens 16 --rounds 2 --kills 5

Three ``splitlm-trunkd`` (``--threads 1`` each) on unix sockets; one client process loads the
bottom and top once and runs ``--sessions`` greedy generations at once, one thread each, first
through the first daemon alone, then through the replica set of all three (interleaved,
``--rounds`` times). Then ``--kills`` times: a session on the set is generating; after token 8
the replica holding it is killed -9 (and restarted afterwards for the next round); the session's
``Resumed`` event gives the time from the break to the interrupted step's reply.

Prints one JSON object per measurement and a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _common import prompt_ids, start_daemon, stop

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def sessions_open(address: str) -> int:
    from splitlm.shared.client import TrunkClient

    c = TrunkClient(address, connect_timeout_s=10)
    try:
        return int(c.info().sessions_open)
    finally:
        c.close()


def run_sessions(parts: Any, client: Any, model: Any, n: int, tokens: int, addresses: list[str]) -> dict[str, Any]:
    """``n`` sessions opened on ``client``, their count per replica, then all generating at once."""
    from splitlm.shared import prepare
    from splitlm.shared.generation import GenerationSettings, generate

    pipes = [prepare.split_pipeline(parts, client) for _ in range(n)]
    per_replica = [sessions_open(a) for a in addresses]
    done: list[int] = []

    def work(i: int) -> None:
        out = generate(pipes[i], model.tokenizer, prompt_ids(16 + i), GenerationSettings(max_new_tokens=tokens), [])
        done.append(len(out.token_ids))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    for p in pipes:
        p.close()
    return {"sessions_per_replica": per_replica, "tokens": sum(done), "wall_s": round(wall, 2),
            "tokens_per_s": round(sum(done) / wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--sessions", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--kills", type=int, default=5)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from splitlm.shared import prepare
    from splitlm.shared.client import TrunkClient, replica_target
    from splitlm.shared.failover import RetryPolicy
    from splitlm.shared.generation import GenerationSettings, TokenEvent, generate

    tmp = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    addresses = [f"unix:{tmp / f'r{i}.sock'}" for i in range(3)]
    daemons = [start_daemon(args.model, a, tmp / f"r{i}.log", "--threads", "1") for i, a in enumerate(addresses)]
    model = prepare.load_model(args.model)
    one, three = TrunkClient(addresses[0]), TrunkClient(replica_target(addresses))
    parts = prepare.split_parts(model, one.info(), torch.device("cpu"))
    three.info()
    results: dict[str, list[dict[str, Any]]] = {"1 replica": [], "3 replicas": []}
    try:
        for r in range(args.rounds):
            for name, client in (("1 replica", one), ("3 replicas", three)):
                res = run_sessions(parts, client, model, args.sessions, args.tokens, addresses)
                res.update(setup=name, round=r, loadavg=open("/proc/loadavg").read().split()[0])
                print(json.dumps(res), flush=True)
                results[name].append(res)
        moves = []
        for k in range(args.kills):
            victim: list[int] = []

            def on_token(ev: TokenEvent, victim: list[int] = victim) -> None:
                if ev.index == 8:
                    held = [sessions_open(a) for a in addresses]
                    victim.append(held.index(1))
                    daemons[victim[0]].proc.kill()
                    daemons[victim[0]].proc.wait()

            pipe = prepare.split_pipeline(parts, three, retry=RetryPolicy())
            generate(pipe, model.tokenizer, prompt_ids(24), GenerationSettings(max_new_tokens=20), [], on_token=on_token)
            session: Any = pipe.session
            ev = session.resumes[0]
            pipe.close()
            row = {"kill": k, "replica": victim[0], "move_ms": round(ev.downtime_s * 1e3, 1),
                   "replay_ms": round(ev.replay_s * 1e3, 1), "replayed_positions": ev.replayed_positions,
                   "attempts": ev.attempts, "loadavg": open("/proc/loadavg").read().split()[0]}
            print(json.dumps(row), flush=True)
            moves.append(row)
            daemons[victim[0]].stop()
            daemons[victim[0]] = start_daemon(args.model, addresses[victim[0]], tmp / f"r{victim[0]}-{k}.log", "--threads", "1")
        print("summary:")
        for name, rows in results.items():
            print(f"  {name}: {args.sessions} sessions x {args.tokens} tokens: median "
                  f"{statistics.median(r['tokens_per_s'] for r in rows):.1f} tokens/s; sessions per replica "
                  f"{[r['sessions_per_replica'] for r in rows]}")
        if moves:
            print(f"  move after kill -9: median {statistics.median(m['move_ms'] for m in moves):.0f} ms "
                  f"(min {min(m['move_ms'] for m in moves):.0f}, max {max(m['move_ms'] for m in moves):.0f}), "
                  f"attempts {[m['attempts'] for m in moves]}")
    finally:
        one.close()
        three.close()
        stop(*daemons)


if __name__ == "__main__":
    main()
