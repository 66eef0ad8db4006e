"""The split's per-step transport overhead (round trip - daemon compute), three client designs,
measured interleaved against one real daemon serving a tiny random model (compute ~negligible):

- ``sync-queue``: splitlm's ``TrunkStream`` (sync stub; requests handed to grpc's thread
  through a queue-fed request iterator; replies read from the call iterator);
- ``aio-own-loop``: ``grpc.aio`` on an event loop owned by the stepping thread
  (``run_until_complete`` per step: no Python thread hand-off);
- ``aio-loop-thread``: ``grpc.aio`` on a loop in a background thread
  (``run_coroutine_threadsafe`` per step).

A measurement tool, not a test.  .venv/bin/python scripts/rpc_ab.py --steps 300 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import start_daemon, stop


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import grpc
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from splitlm.protos import trunk_pb2 as pb
    from splitlm.protos import trunk_pb2_grpc as pb_grpc
    from splitlm.shared import codec
    from splitlm.shared.client import (
        DEFAULT_MAX_MESSAGE_BYTES,
        TrunkClient,
        TrunkStream,
        channel_options,
    )
    from splitlm.shared.plan import Fingerprint
    from tests.conftest import save_tiny

    tmp = Path(tempfile.mkdtemp(prefix="splitlm-rpc-"))
    model_dir = save_tiny("llama", tmp / "tiny")
    sock = tmp / "t.sock"
    proc = start_daemon(str(model_dir), f"unix:{sock}", None, "--threads", "1", "--log-level", "WARNING",
                        timeout_s=180)
    try:
        client = TrunkClient(f"unix:{sock}", connect_timeout_s=1.0)
        info = client.info()
        p = info.plan
        fp = Fingerprint(p.config_digest, p.weights_digest, p.trunk_start, p.trunk_end)
        hidden = int(p.hidden_size)
        h = torch.randn(1, 1, hidden)

        def open_request() -> pb.SessionRequest:
            return pb.SessionRequest(open=pb.OpenSession(
                fingerprint=fp.digest, config_digest=fp.config_digest, weights_digest=fp.weights_digest,
                trunk_start=fp.start, trunk_end=fp.end, wire_dtype=codec.PB_OF[torch.float32], client="rpc_ab",
            ))

        def step_request(i: int) -> pb.SessionRequest:
            req = pb.SessionRequest()
            req.step.step_id = i + 1
            req.step.position = i
            codec.encode(h, torch.float32, out=req.step.hidden)
            return req

        def sync_queue() -> list[float]:
            s = TrunkStream(client, fp, torch.float32)
            out = []
            for i in range(args.steps):
                t0 = time.perf_counter()
                _, compute = s.step(h, i)
                out.append(time.perf_counter() - t0 - compute)
            s.close()
            return out

        loop = asyncio.new_event_loop()

        async def make_channel() -> pb_grpc.TrunkStub:  # a channel belongs to the loop it is made in
            ch = grpc.aio.insecure_channel(f"unix:{sock}", options=channel_options(DEFAULT_MAX_MESSAGE_BYTES))
            return pb_grpc.TrunkStub(ch)

        astub = loop.run_until_complete(make_channel())

        async def one(call: object, i: int) -> pb.SessionReply:
            await call.write(step_request(i))  # type: ignore[attr-defined]
            return await call.read()  # type: ignore[attr-defined,no-any-return]

        def aio_own_loop() -> list[float]:
            # one coroutine per step, run by this thread: what a blocking step() would do
            call_box: list[object] = []

            async def opened() -> None:
                call = astub.Session()
                await call.write(open_request())
                await call.read()
                call_box.append(call)

            loop.run_until_complete(opened())
            call = call_box[0]
            out = []
            for i in range(args.steps):
                t0 = time.perf_counter()
                reply = loop.run_until_complete(one(call, i))
                out.append(time.perf_counter() - t0 - reply.result.compute_us / 1e6)
            loop.run_until_complete(call.done_writing())  # type: ignore[attr-defined]
            return out

        bg = asyncio.new_event_loop()
        threading.Thread(target=bg.run_forever, daemon=True).start()
        bstub = asyncio.run_coroutine_threadsafe(make_channel(), bg).result()

        def aio_loop_thread() -> list[float]:
            async def opened() -> object:
                call = bstub.Session()  # type: ignore[attr-defined]
                await call.write(open_request())
                await call.read()
                return call

            call = asyncio.run_coroutine_threadsafe(opened(), bg).result()
            out = []
            for i in range(args.steps):
                t0 = time.perf_counter()
                reply = asyncio.run_coroutine_threadsafe(one(call, i), bg).result()
                out.append(time.perf_counter() - t0 - reply.result.compute_us / 1e6)
            asyncio.run_coroutine_threadsafe(call.done_writing(), bg).result()  # type: ignore[attr-defined]
            return out

        designs = {"sync-queue": sync_queue, "aio-own-loop": aio_own_loop, "aio-loop-thread": aio_loop_thread}
        med: dict[str, list[float]] = {k: [] for k in designs}
        for name, fn in designs.items():
            print(f"warm-up {name}", file=sys.stderr, flush=True)
            fn()
        for _ in range(args.rounds):
            for name, fn in designs.items():
                med[name].append(statistics.median(fn()[10:]) * 1e6)
        res = {k: {"overhead_us_median": round(statistics.median(v), 1), "rounds": [round(x) for x in v]}
               for k, v in med.items()}
        res["hidden"] = hidden  # type: ignore[assignment]
        print(json.dumps(res, indent=1))
    finally:
        stop(proc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
