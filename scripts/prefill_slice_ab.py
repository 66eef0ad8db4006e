"""A/B of the daemon's ``--prefill-slice``: decode steps of N sessions beside one session that
prefills ``--prefill`` positions over and over, per slice setting and batching mode.

One SmolLM2 daemon per (slice, batch) pair, all started first; then for each session count the
pairs run in turn (the order rotating per count), each row ``splitlm bench --load``'s own run
(``tui.bench.load.run_load``: real sessions over real gRPC, replayed hidden states). Prints one
line per row: decode p50/p95/max, aggregate decode positions/s and the long prefill's p50. Usage:
``python scripts/prefill_slice_ab.py [--slices 0,4096] [--sessions 1,4,8] [--prefill 1024]
[--steps 32] [--modes solo,batch] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from contextlib import ExitStack
from pathlib import Path

from splitlm.shared.client import TrunkClient
from splitlm.shared.launcher import OwnedDaemon
from splitlm.tui.bench.load import Target, run_load, target_of


def _ints(raw: str) -> list[int]:
    return [int(x) for x in raw.split(",")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--slices", type=_ints, default=[0, 4096])
    p.add_argument("--sessions", type=_ints, default=[1, 4, 8])
    p.add_argument("--prefill", type=int, default=1024)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--modes", default="solo,batch")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    rows = []
    with ExitStack() as stack:
        targets: list[tuple[int, Target]] = []
        for mode in a.modes.split(","):
            for sl in a.slices:
                args = ["--model", a.model, "--log-level", "WARNING", "--idle-timeout", "0",
                        "--prefill-slice", str(sl)] + (["--batch"] if mode == "batch" else [])
                d = OwnedDaemon(args, name=f"daemon {mode} slice {sl}")
                stack.callback(d.stop)
                info = d.start()

                def connect(address: str = d.address) -> TrunkClient:
                    return TrunkClient(address)

                c = connect()
                stack.callback(c.close)
                targets.append((sl, target_of(mode, c, info, d.pid, connect)))
        print("mode   slice sessions  p50 ms  p95 ms  max ms  positions/s  prefill p50 ms  prefills  load")
        for k, n in enumerate(a.sessions):
            order = targets[k % len(targets):] + targets[:k % len(targets)]
            for sl, t in order:
                r = run_load(t, n, a.prompt, a.steps, a.prefill, seed=0)
                load = os.getloadavg()[0]
                rows.append({"slice": sl, **dataclasses.asdict(r), "loadavg": load})
                print(f"{r.mode:<6} {sl:>5} {n:>8} {r.step_p50_ms:>7.1f} {r.step_p95_ms:>7.1f} {r.step_max_ms:>7.1f} "
                      f"{r.positions_per_s:>12.1f} {r.prefill_p50_ms or 0:>15.0f} {r.prefills:>9} {load:>5.1f}",
                      flush=True)
    if a.json is not None:
        a.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
