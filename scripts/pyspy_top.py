"""Top lines of a py-spy raw profile of a split decode (client and daemon), steady state only.

    .venv/bin/py-spy record -r 200 -f raw -o prof.raw --subprocesses -- \\
        .venv/bin/python scripts/profile_split.py --split-only --rounds 3 --tokens 32
    .venv/bin/python scripts/pyspy_top.py prof.raw

Client samples are those under ``generate``; daemon samples those of its compute thread and
its event loop. Prints self time per line and inclusive time per function, in % of each side.
"""

from __future__ import annotations

import argparse
import collections


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("profile", help="a py-spy raw profile (py-spy record -f raw)")
    args = p.parse_args()
    self_time = {"client": collections.Counter[str](), "daemon": collections.Counter[str]()}
    inclusive = {"client": collections.Counter[str](), "daemon": collections.Counter[str]()}
    totals = collections.Counter[str]()
    with open(args.profile) as fh:
        for line in fh:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            n = int(count)
            frames = stack.split(";")
            side = "daemon" if len(frames) > 1 and "splitlm.daemon.cli" in frames[1] else "client"
            if side == "client" and not any(f.startswith("generate (") for f in frames):
                continue
            if side == "daemon" and not any(
                key in f for f in frames for key in ("_run_step", "run_forever", "Session (")
            ):
                continue
            totals[side] += n
            self_time[side][frames[-1]] += n
            seen = set()
            for f in frames[2:]:
                name = f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0] + ")"
                if name not in seen:
                    inclusive[side][name] += n
                    seen.add(name)
    for side in ("client", "daemon"):
        if not totals[side]:
            continue
        print(f"== {side}: {totals[side]} samples, self time, top 12")
        for f, n in self_time[side].most_common(12):
            print(f"{100 * n / totals[side]:5.1f}%  {f}")
        print(f"== {side}: inclusive, top 25")
        for f, n in inclusive[side].most_common(25):
            print(f"{100 * n / totals[side]:5.1f}%  {f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
