"""Chained daemons: per-hop overhead and tokens/s with 1, 2 and 3 hops, client-driven hops against
a forwarding prototype, with and without a slow link (issue 14; BENCHMARKS.md "Chained daemons").

Starts SmolLM2 daemons for three routes over the same trunk layers 2:28 (one daemon 2:28; two,
2:15 + 15:28; three, 2:10 + 10:19 + 19:28), each on its own unix socket, one torch thread each,
and for the 2- and 3-hop routes a forwarder (``scripts/chain_forwarder.py``) beside them. Then,
interleaved over ``--rounds`` rounds, one greedy reply of ``--new-tokens`` tokens per (route,
link RTT, mode):

- ``client``: the client steps each hop itself (``shared.route``); with an RTT every hop sits
  behind its own delayed relay (``shared.relay``): the client's slow link is crossed once per hop;
- ``forward``: the client talks to the forwarder through one delayed relay; the forwarder steps
  the hops over local sockets: the slow link is crossed once per step.

Prints a table (median per-token latency, tokens/s, the overhead: a decode token's wall time
less all compute, the added overhead per extra hop, and wire bytes per decode token at the
client) and writes JSON. Every run's tokens are checked against the 1-hop run of the same round.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_hops.py --rtt 0,20,50 --rounds 3 --json hops.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from _common import prompt_ids, stop

ROUTES = {1: ["2:28"], 2: ["2:15", "15:28"], 3: ["2:10", "10:19", "19:28"]}


def _wait_socket(path: Path, proc: subprocess.Popen[bytes], timeout_s: float = 120) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None or time.monotonic() - t0 > timeout_s:
            raise SystemExit(f"the forwarder at {path} did not start")
        time.sleep(0.1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--rtt", default="0,20,50", help="link RTTs in ms, comma-separated (0: no relay)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--hops", default="1,2,3")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    torch.set_num_threads(1)
    from splitlm.shared import prepare, route
    from splitlm.shared.client import TrunkClient
    from splitlm.shared.failover import NO_FAILOVER
    from splitlm.shared.generation import GenerationSettings, generate
    from splitlm.shared.launcher import OwnedDaemon
    from splitlm.shared.relay import Relay

    rtts = [float(x) for x in args.rtt.split(",")]
    hops_wanted = [int(h) for h in args.hops.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="splitlm-hops-"))
    rows: dict[tuple[int, float, str], list[dict[str, float]]] = {}
    mismatches: list[str] = []
    load0 = os.getloadavg()
    with ExitStack() as stack:
        daemons: dict[int, list[str]] = {}
        forwarders: dict[int, str] = {}
        owned = []
        for h in hops_wanted:  # every daemon loads at once: on a busy machine each takes a minute
            addrs = []
            for split in ROUTES[h]:
                stem = f"h{h}-" + split.replace(":", "-")
                a = f"unix:{tmp / (stem + '.sock')}"
                d = OwnedDaemon(["--model", args.model, "--split", split, "--threads", "1"], address=a,
                                log_path=tmp / (stem + ".log"), name=f"the {split} daemon")
                d.spawn()
                stack.callback(stop, d)
                owned.append(d)
                addrs.append(a)
            daemons[h] = addrs
        for d in owned:
            d.wait_ready(600)
        for h in hops_wanted:
            addrs = daemons[h]
            if h > 1:
                sock = tmp / f"fwd{h}.sock"
                cmd = [sys.executable, str(Path(__file__).with_name("chain_forwarder.py")), "--listen", f"unix:{sock}"]
                for a in addrs:
                    cmd += ["--next", a]
                proc = subprocess.Popen(cmd, stderr=open(tmp / f"fwd{h}.log", "wb"))  # noqa: SIM115
                stack.callback(lambda p=proc: (p.terminate(), p.wait(10)))
                _wait_socket(sock, proc)
                forwarders[h] = f"unix:{sock}"
        print(f"daemons up: {', '.join(f'{h} hop(s) {ROUTES[h]}' for h in hops_wanted)}", file=sys.stderr)
        model = prepare.load_model(args.model)
        first = route.connect(daemons[hops_wanted[0]], TrunkClient)
        parts = prepare.split_parts(model, first.info(), torch.device("cpu"))
        first.close()
        ids = prompt_ids(args.prompt_tokens, int(model.source.config.vocab_size))
        settings = GenerationSettings(max_new_tokens=args.new_tokens)

        def run(addresses: list[str]) -> tuple[dict[str, float], list[int]]:
            client = route.connect(addresses, TrunkClient)
            try:
                pipe = prepare.split_pipeline(parts, client, retry=NO_FAILOVER)
                after_prefill: list[int] = []

                def on_token(ev: Any) -> None:
                    if ev.index == 0:
                        after_prefill.append(pipe.bytes_sent + pipe.bytes_received)

                t0 = time.perf_counter()
                res = generate(pipe, model.tokenizer, ids, settings, [], on_token=on_token)
                total = time.perf_counter() - t0
                decode_bytes = pipe.bytes_sent + pipe.bytes_received - after_prefill[0]
                pipe.close()
            finally:
                client.close()
            decode = res.per_token_s
            # a decode token's wall time less all compute (bottom, top, every hop's trunk): the
            # link, serialisation and scheduling a hop adds, less sensitive to a busy CPU
            overhead = [w - c - t for w, c, t in zip(decode, res.client_compute_s[1:], res.trunk_compute_s[1:])]
            return {
                "per_token_ms": statistics.median(decode) * 1e3,
                "overhead_ms": statistics.median(overhead) * 1e3,
                "tokens_per_s": (len(decode)) / sum(decode),
                "ttft_ms": res.ttft_s * 1e3,
                "total_s": total,
                "bytes_per_token": decode_bytes / max(1, len(res.token_ids) - 1),
            }, res.token_ids

        for h in hops_wanted:  # warm-up, not recorded: first touches of every daemon's weights
            for mode in ("client", "forward") if h > 1 else ("client",):
                run(daemons[h] if mode == "client" else [forwarders[h]])
        for rnd in range(args.rounds):
            for rtt in rtts:
                ref: list[int] | None = None
                for h in hops_wanted:
                    for mode in ("client", "forward") if h > 1 else ("client",):
                        targets = daemons[h] if mode == "client" else [forwarders[h]]
                        relays = []
                        if rtt > 0:
                            for t in targets:
                                r = Relay(t, rtt_s=rtt / 1e3).start()
                                relays.append(r)
                            addresses = [r.address for r in relays]
                        else:
                            addresses = targets
                        try:
                            fig, tokens = run(addresses)
                        finally:
                            for r in relays:
                                r.stop()
                        if ref is None:
                            ref = tokens
                        elif tokens != ref:
                            mismatches.append(f"round {rnd} rtt {rtt} {h} hops {mode}")
                        rows.setdefault((h, rtt, mode), []).append(fig)
                        print(f"round {rnd + 1}/{args.rounds} rtt {rtt:g} ms {h} hop(s) {mode}: "
                              f"{fig['per_token_ms']:.1f} ms/token", file=sys.stderr, flush=True)
    load1 = os.getloadavg()
    table = []
    base = {rtt: statistics.median(f["overhead_ms"] for f in rows[(hops_wanted[0], rtt, "client")]) for rtt in rtts}
    print(f"{'hops':>4} {'RTT ms':>7} {'mode':>8} {'ms/token':>9} {'tokens/s':>9} {'overhead ms':>12} "
          f"{'per extra hop ms':>17} {'decode B/token':>14}")
    for (h, rtt, mode), figs in sorted(rows.items()):
        med = {k: statistics.median(f[k] for f in figs) for k in figs[0]}
        extra = (med["overhead_ms"] - base[rtt]) / (h - hops_wanted[0]) if h > hops_wanted[0] else None
        table.append({"hops": h, "rtt_ms": rtt, "mode": mode, "runs": len(figs), **med,
                      "per_extra_hop_ms": extra})
        print(f"{h:>4} {rtt:>7g} {mode:>8} {med['per_token_ms']:>9.1f} {med['tokens_per_s']:>9.2f} "
              f"{med['overhead_ms']:>12.1f} "
              f"{'' if extra is None else f'{extra:.1f}':>17} {med['bytes_per_token']:>14.0f}")
    print(f"tokens identical across every route and mode: {not mismatches}"
          + (f" (differ: {mismatches})" if mismatches else ""))
    print(f"load average before {load0[0]:.2f}, after {load1[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps({
            "command": " ".join(sys.argv), "model": args.model, "routes": {str(h): ROUTES[h] for h in hops_wanted},
            "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens, "rounds": args.rounds,
            "loadavg": {"before": load0, "after": load1}, "identical": not mismatches, "rows": table,
        }, indent=1))
    return 0 if not mismatches else 1


if __name__ == "__main__":
    sys.exit(main())
