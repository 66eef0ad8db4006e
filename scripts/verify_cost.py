"""What a verification step costs: one step of t = 1..9 positions (logits for all t, as a draft's
verification asks) at a fixed context, on the full model in this process, with the products of 2+
rows through oneDNN (``shared.models.small_rows``, as parts are built), padded to 4 rows under MKL
(the previous way) and plain MKL. A measurement
tool, not a test; its ratios back ``shared.draft.control.VERIFY_COST``.

Each round runs every t once, in turn, both ways, so drift of a shared machine hits all alike;
the figure per t is the median over ``--reps`` rounds of the process's CPU time. ``--profile`` adds a torch.profiler table of
the top ops for a few t (which op makes a t slow).

    .venv/bin/python scripts/verify_cost.py --threads 1 --reps 20 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from _common import load_full, prompt_ids


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--context", type=int, default=200, help="positions cached before each step")
    ap.add_argument("--reps", type=int, default=20, help="rounds; each runs every t once")
    ap.add_argument("--max-t", type=int, default=9, help="steps of 1..MAX_T positions")
    ap.add_argument("--profile", action="store_true", help="also profile plain steps of t = 1, 2, 3, 4 by op")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    _, full = load_full(args.model, args.threads)
    import torch

    from splitlm.shared.models import small_rows
    from splitlm.shared.models.small_rows import pad_small_products, unpad

    ctx = prompt_ids(args.context)
    cache = full.new_cache()
    full.forward(torch.tensor([ctx]), 0, cache)
    ts = list(range(1, args.max_t + 1))
    steps = {t: torch.tensor([prompt_ids(args.context + t)[args.context :]]) for t in ts}

    def step(t: int) -> tuple[float, float]:
        """Wall and CPU seconds of one step of t positions. The process's CPU time is what the
        other load of a shared machine inflates least (time slices it waits out do not count)."""
        c0, t0 = time.process_time(), time.perf_counter()
        full.forward(steps[t], args.context, cache, logits_for=t)  # rolls back to the context first
        return time.perf_counter() - t0, time.process_time() - c0

    def use(onednn: bool, small: bool) -> None:
        small_rows.ONEDNN = onednn
        (pad_small_products if small else unpad)(full.model)

    modes = {
        "onednn": lambda: use(True, True),
        "padded": lambda: use(False, True),
        "plain": lambda: use(False, False),
    }
    for set_mode in modes.values():  # warm-up: every shape once, both ways
        set_mode()
        for t in ts:
            step(t)
    wall = {(m, t): [] for m in modes for t in ts}
    cpu = {(m, t): [] for m in modes for t in ts}
    for _ in range(args.reps):
        for mode, set_mode in modes.items():
            set_mode()
            for t in ts:
                w, c = step(t)
                wall[mode, t].append(w)
                cpu[mode, t].append(c)
    med = {k: statistics.median(v) * 1e3 for k, v in cpu.items()}
    print(f"{args.model} full model, {args.threads} thread(s), context {args.context}, median of {args.reps} "
          "(CPU ms of the process; wall ms in brackets)")
    print(f"{'t':>3} " + " ".join(f"{m + ' ms':>17} {'x t=1':>6}" for m in modes))
    for t in ts:
        cells = [f"{med[m, t]:6.1f} [{statistics.median(wall[m, t]) * 1e3:7.1f}] {med[m, t] / med[m, 1]:6.2f}"
                 for m in modes]
        print(f"{t:>3} " + " ".join(cells))
    res: dict[str, Any] = {"threads": args.threads, "context": args.context, "reps": args.reps}
    for m in modes:
        res[m] = {
            "median_cpu_ms": {t: round(med[m, t], 2) for t in ts},
            "median_wall_ms": {t: round(statistics.median(wall[m, t]) * 1e3, 2) for t in ts},
            "iqr_cpu_ms": {t: round(_iqr(cpu[m, t]) * 1e3, 2) for t in ts},
            "extra_per_position": {t: round((med[m, t] / med[m, 1] - 1) / (t - 1), 3) for t in ts if t > 1},
        }
    modes["onednn"]()
    if args.profile:  # as parts are built: where the time of a step goes
        res["profile"] = {t: _profile(step, t) for t in (1, 2, 3, 4)}
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


def _iqr(xs: list[float]) -> float:
    q = statistics.quantiles(xs, n=4)
    return q[2] - q[0]


def _profile(step: Any, t: int, reps: int = 5) -> list[tuple[str, float]]:
    """The ops taking the most self CPU time over ``reps`` steps of t positions (ms per step)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(reps):
            step(t)
    table = prof.key_averages(group_by_input_shape=True)
    rows = sorted(table, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    print(f"\nprofile t={t} (self CPU ms per step)")
    out = []
    for e in rows:
        ms = e.self_cpu_time_total / 1e3 / reps
        print(f"  {ms:7.2f}  {e.key} {str(e.input_shapes)[:70]}")
        out.append((f"{e.key} {e.input_shapes}", round(ms, 2)))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
