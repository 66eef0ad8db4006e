"""Where a split decode step's time goes beyond compute: a timeline of one step, both processes.

Starts its own daemon with its handlers wrapped to take timestamps (this script with ``--serve``),
wraps the client session's send and receive the same way, decodes with the split, and lines the
two up by step (``time.perf_counter`` is CLOCK_MONOTONIC, one clock for both processes on Linux).
Prints the median of each leg over the decode steps of the last run:

    up       client hands the step to gRPC -> the daemon's handler has the message
    to-exec  handler has it -> the compute starts (decode, checks, any executor hand-off)
    compute  the trunk's forward and the encode of its output (what the reply reports)
    back     compute done -> the handler has the result again (the event loop wakes, if it slept)
    down     the handler returns the reply -> the client has it

``--pipe`` prints the floor to compare with: a bare pipe round trip between two processes, back to
back and after the cores have idled for 1-40 ms (as they do during a trunk step).

A measurement tool, not a test: ``.venv/bin/python scripts/step_timeline.py [--model M] [--pipe]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import prompt_ids, start_daemon, stop


def serve(argv: list[str]) -> int:
    """The daemon, its handlers timed; the records go to ``$TIMELINE_OUT`` at exit."""
    import atexit

    from splitlm.daemon import cli, service, steps

    records: list[dict[str, float]] = []
    now: dict[str, float] = {}
    next_request, step, run_step = (
        service.TrunkService._next_request, service.TrunkService._step, steps.TrunkSteps._forward,
    )
    if "TIMELINE_INLINE" in os.environ:  # the A/B of running decode steps on the loop
        steps.INLINE_MAX_POSITIONS = int(os.environ["TIMELINE_INLINE"])

    async def timed_next(self: Any, requests: Any) -> Any:
        req = await next_request(self, requests)
        now["got"] = time.perf_counter()
        return req

    async def timed_step(self: Any, s: Any, req: Any) -> Any:
        t0 = time.perf_counter()
        reply = await step(self, s, req)
        records.append({**now, "step0": t0, "step1": time.perf_counter()})
        return reply

    def timed_run(self: Any, *args: Any, **kw: Any) -> Any:
        now["c0"] = time.perf_counter()
        out = run_step(self, *args, **kw)
        now["c1"] = time.perf_counter()
        return out

    service.TrunkService._next_request = timed_next  # type: ignore[method-assign]
    service.TrunkService._step = timed_step  # type: ignore[method-assign]
    steps.TrunkSteps._forward = timed_run  # type: ignore[method-assign]
    atexit.register(lambda: Path(os.environ["TIMELINE_OUT"]).write_text(json.dumps(records)))
    return cli.main(argv)


def pipe_floor(rounds: int = 60) -> None:
    """Round trips of one byte between this process and a forked child, idling between them."""
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child echoes until it reads 'q'
        while os.read(r1, 1) != b"q":
            os.write(w2, b"x")
        os._exit(0)
    for gap in (0.0, 0.001, 0.01, 0.04):
        lat = []
        for _ in range(rounds):
            time.sleep(gap)
            t = time.perf_counter()
            os.write(w1, b"p")
            os.read(r2, 1)
            lat.append(time.perf_counter() - t)
        print(f"pipe round trip after {gap * 1e3:4.0f} ms idle: p50 {statistics.median(lat) * 1e6:6.1f} us")
    os.write(w1, b"q")
    os.waitpid(pid, 0)


def main() -> int:
    if sys.argv[1:2] == ["--serve"]:
        return serve(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pipe", action="store_true", help="also print the bare pipe round-trip floor")
    ap.add_argument("--inline", type=int, default=None,
                    help="the daemon's INLINE_MAX_POSITIONS (0: every step on the executor, as before)")
    args = ap.parse_args()
    if args.pipe:
        pipe_floor()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    from splitlm.shared import client as cl
    from splitlm.shared import prepare
    from splitlm.shared.failover import NO_FAILOVER
    from splitlm.shared.generation import GenerationSettings, LocalPipeline, generate

    tmp = Path(tempfile.mkdtemp(prefix="splitlm-timeline-"))
    sock, out = tmp / "t.sock", tmp / "daemon.json"
    os.environ["TIMELINE_OUT"] = str(out)  # the instrumented server writes its step times there
    if args.inline is not None:
        os.environ["TIMELINE_INLINE"] = str(args.inline)
    proc = start_daemon(args.model, f"unix:{sock}", None, "--log-level", "WARNING",
                        program=[sys.executable, __file__, "--serve"])
    sent: list[float] = []
    got: list[float] = []
    send, receive = cl.TrunkStream._send, cl.TrunkStream._receive

    def timed_send(self: Any, req: Any) -> None:
        sent.append(time.perf_counter())
        send(self, req)

    def timed_receive(self: Any) -> Any:
        reply = receive(self)
        got.append(time.perf_counter())
        return reply

    cl.TrunkStream._send = timed_send  # type: ignore[method-assign]
    cl.TrunkStream._receive = timed_receive  # type: ignore[method-assign]
    lat: dict[str, list[float]] = {"full": [], "split": []}
    try:
        client = cl.TrunkClient(f"unix:{sock}")
        info = client.info()
        model = prepare.load_model(args.model)
        parts = prepare.split_parts(model, info, torch.device("cpu"), with_full=True)
        assert parts.full is not None
        ids = prompt_ids(16, int(model.source.config.vocab_size))
        for rnd in range(args.rounds + 1):  # round 0 warms up
            for mode in ("full", "split"):
                sent.clear()
                got.clear()
                pipe = LocalPipeline(parts.full) if mode == "full" else prepare.split_pipeline(parts, client, retry=NO_FAILOVER)
                r = generate(pipe, model.tokenizer, ids, GenerationSettings(max_new_tokens=args.tokens), eos_ids=[])
                pipe.close()
                if rnd:
                    lat[mode].append(statistics.median(r.per_token_s))
        client.close()
    finally:
        stop(proc)
    steps = json.loads(out.read_text())
    # the last split run: its open is the first send and reply; then the prefill, then decode steps
    sent, got, steps = sent[1:], got[1:], steps[-(len(sent) - 1):]
    legs = {
        "up": [d["got"] - s for s, d in zip(sent, steps)],
        "to-exec": [d["c0"] - d["step0"] for d in steps],
        "compute": [d["c1"] - d["c0"] for d in steps],
        "back": [d["step1"] - d["c1"] for d in steps],
        "down": [g - d["step1"] for g, d in zip(got, steps)],
    }
    print(f"{'leg':10} {'p50 ms':>9} {'max ms':>9}   (decode steps of the last split run)")
    for name, v in legs.items():
        v = v[1:]  # drop the prefill
        print(f"{name:10} {statistics.median(v) * 1e3:9.3f} {max(v) * 1e3:9.3f}")
    wire = sum(statistics.median(v[1:]) for k, v in legs.items() if k != "compute")
    full, split = statistics.median(lat["full"]), statistics.median(lat["split"])
    print(f"legs but compute: {wire * 1e3:.3f} ms; per token: full {full * 1e3:.2f} ms, split {split * 1e3:.2f} ms, "
          f"split / full {split / full:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
