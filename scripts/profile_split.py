"""Per-token latency of the full model and the split, measured interleaved in one run.

Starts its own trunk daemon (a subprocess on a unix socket), loads bottom + top + full here, then
alternates full and split decodes (rounds), so a busy machine disturbs both alike. Prints medians:
per-token latency at a short and a long context, TTFT, and the split overhead per token
(latency - client compute - trunk compute). A measurement tool, not a test.

    .venv/bin/python scripts/profile_split.py --client-threads 1 --daemon-threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from _common import prompt_ids, start_daemon, stop


def _set_affinity(pid: int, cpus: set[int]) -> None:
    """Pin every thread of process ``pid`` (Linux: affinity is per thread)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:
            pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--client-threads", type=int, default=1)
    ap.add_argument("--daemon-threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=24, help="decoded tokens per run")
    ap.add_argument("--short", type=int, default=16, help="short prompt length")
    ap.add_argument("--long", type=int, default=0, help="long prompt length (0: skip)")
    ap.add_argument("--daemon-arg", action="append", default=[])
    ap.add_argument("--pin-ab", action="store_true",
                    help="also run the split with client and daemon pinned to one CPU, interleaved")
    ap.add_argument("--split-only", action="store_true", help="decode the split only (for profiling)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    import torch

    torch.set_num_threads(args.client_threads)
    from splitlm.shared import prepare
    from splitlm.shared.client import TrunkClient
    from splitlm.shared.failover import NO_FAILOVER
    from splitlm.shared.generation import GenerationSettings, LocalPipeline, generate

    tmp = Path(tempfile.mkdtemp(prefix="splitlm-prof-"))
    sock = tmp / "t.sock"
    proc = start_daemon(args.model, f"unix:{sock}", None, "--threads", str(args.daemon_threads), "--log-level",
                        "WARNING", *args.daemon_arg)
    try:
        client = TrunkClient(f"unix:{sock}")
        info = client.info()
        model = prepare.load_model(args.model)
        parts = prepare.split_parts(model, info, torch.device("cpu"), with_full=True)
        assert parts.full is not None
        vocab = int(model.source.config.vocab_size)
        results: dict[str, dict[str, list[float]]] = {}

        def run(name: str, make: object, n_prompt: int) -> None:
            ids = prompt_ids(n_prompt, vocab)
            settings = GenerationSettings(max_new_tokens=args.tokens)
            pipe = make()  # type: ignore[operator]
            r = generate(pipe, model.tokenizer, ids, settings, eos_ids=[])
            pipe.close()
            rec = results.setdefault(f"{name}@{n_prompt}", {"lat": [], "ttft": [], "ovh": [], "ids": []})
            rec["lat"].append(statistics.median(r.per_token_s))
            rec["ttft"].append(r.ttft_s)
            ovh = [lat - c - t for lat, c, t in zip(r.per_token_s, r.client_compute_s[1:], r.trunk_compute_s[1:])]
            rec["ovh"].append(statistics.median(ovh))
            rec["ids"] = r.token_ids

        def full() -> LocalPipeline:
            return LocalPipeline(parts.full)

        def split() -> object:
            return prepare.split_pipeline(parts, client, retry=NO_FAILOVER)

        lengths = [args.short] + ([args.long] if args.long else [])
        for n in lengths:  # warm-up
            run("warm-full", full, n)
            run("warm-split", split, n)
        if args.split_only:
            for _ in range(args.rounds):
                run("split", split, args.short)
            print(json.dumps({k: statistics.median(v["lat"]) * 1e3 for k, v in results.items()}))
            return 0
        all_cpus = os.sched_getaffinity(0)
        for _ in range(args.rounds):
            for n in lengths:
                run("full", full, n)
                run("split", split, n)
                if args.pin_ab:
                    for pid in (os.getpid(), proc.pid):
                        _set_affinity(pid, {min(all_cpus)})
                    run("split-pinned", split, n)
                    for pid in (os.getpid(), proc.pid):
                        _set_affinity(pid, all_cpus)
        out = {}
        for key, rec in results.items():
            if key.startswith("warm"):
                continue
            out[key] = {
                "per_token_ms": statistics.median(rec["lat"]) * 1e3,
                "ttft_ms": statistics.median(rec["ttft"]) * 1e3,
                "overhead_ms": statistics.median(rec["ovh"]) * 1e3,
            }
        for n in lengths:
            f, s = out[f"full@{n}"], out[f"split@{n}"]
            out[f"ratio@{n}"] = {k: s[k] / f[k] for k in ("per_token_ms", "ttft_ms")}
            out[f"identical@{n}"] = results[f"full@{n}"]["ids"] == results[f"split@{n}"]["ids"]
            if args.pin_ab:
                out[f"ratio-pinned@{n}"] = out[f"split-pinned@{n}"]["per_token_ms"] / f["per_token_ms"]
        if args.long:
            for name in ("full", "split"):
                out[f"{name}_late_over_early"] = (
                    out[f"{name}@{args.long}"]["per_token_ms"] / out[f"{name}@{args.short}"]["per_token_ms"]
                )
        out["threads"] = {"client": args.client_threads, "daemon": args.daemon_threads}
        print(json.dumps(out, indent=None if args.json else 1))
    finally:
        stop(proc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
