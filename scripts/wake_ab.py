"""A/B of the split step's hand-offs: what a decode step costs beyond the daemon's compute.

Starts two daemons on the model, one running every step on its compute executor (as before
issue 13) and one running short steps on its event loop (``daemon.steps.INLINE_MAX_POSITIONS``),
and steps sessions on both with two clients: ``TrunkStream`` (gRPC's sync stream, fed from a
queue by gRPC's request-consumer thread) and a stream on ``grpc.aio`` driven by the stepping thread
itself (the candidate client, not adopted: BENCHMARKS.md, "What was tried"; commit c0b2835 has it
as ``TrunkStream``). The sessions' one-token steps are
interleaved, one each in turn, so load on the machine falls on every variant alike. Per variant
it prints the median of ``round trip - compute`` (the reply's ``compute_us``): the overhead P1b
counts.

A measurement tool, not a test:
``OMP_NUM_THREADS=1 .venv/bin/python scripts/wake_ab.py [--model M] [--steps N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import start_daemon, stop


def serve(argv: list[str]) -> int:
    """The daemon, with ``INLINE_MAX_POSITIONS`` from ``$WAKE_INLINE``."""
    from splitlm.daemon import cli, steps

    steps.INLINE_MAX_POSITIONS = int(os.environ["WAKE_INLINE"])
    return cli.main(argv)


class AioStream:
    """A session on a ``grpc.aio`` stream whose loop the stepping thread runs: a step writes and
    reads on this thread, with no request-consumer thread in between."""

    def __init__(self, address: str, open_msg: Any) -> None:
        import grpc

        from splitlm.protos import trunk_pb2_grpc as pb_grpc
        from splitlm.shared.client import DEFAULT_MAX_MESSAGE_BYTES, channel_options

        self.loop = asyncio.new_event_loop()

        async def start() -> Any:
            self.channel = grpc.aio.insecure_channel(address, options=channel_options(DEFAULT_MAX_MESSAGE_BYTES))
            self.call = pb_grpc.TrunkStub(self.channel).Session()
            await self.call.write(open_msg)
            return await self.call.read()

        self.loop.run_until_complete(start())
        self._ids = 0

    def step(self, hidden: Any, position: int) -> tuple[Any, int]:
        from splitlm.protos import trunk_pb2 as pb
        from splitlm.shared import codec

        self._ids += 1
        req = pb.SessionRequest()
        req.step.step_id = self._ids
        req.step.position = position
        codec.encode(hidden, hidden.dtype, out=req.step.hidden)

        async def go() -> Any:
            await self.call.write(req)
            return await self.call.read()

        reply = self.loop.run_until_complete(go())
        return codec.decode(reply.result.hidden), reply.result.compute_us

    def close(self) -> None:
        async def end() -> None:
            await self.call.done_writing()
            await self.call.code()  # the daemon ended the stream
            await self.channel.close()

        self.loop.run_until_complete(end())
        self.loop.close()


def main() -> int:
    if sys.argv[1:2] == ["--serve"]:
        return serve(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--steps", type=int, default=60, help="one-token steps per variant")
    args = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    from splitlm.protos import trunk_pb2 as pb
    from splitlm.shared import client as cl
    from splitlm.shared import prepare
    from splitlm.shared.failover import NO_FAILOVER

    tmp = Path(tempfile.mkdtemp(prefix="splitlm-wake-"))
    daemons = {}
    try:
        for inline in (0, 4):
            os.environ["WAKE_INLINE"] = str(inline)
            daemons[inline] = start_daemon(args.model, f"unix:{tmp / f'{inline}.sock'}", None,
                                           "--log-level", "WARNING", program=[sys.executable, __file__, "--serve"])
        clients = {k: cl.TrunkClient(f"unix:{tmp / f'{k}.sock'}") for k in daemons}
        info = clients[0].info()
        model = prepare.load_model(args.model)
        parts = prepare.split_parts(model, info, torch.device("cpu"))
        fp = parts.fingerprint
        hidden_size = int(info.plan.hidden_size)
        sessions: dict[str, Any] = {}
        for k, c in clients.items():
            name = "executor" if k == 0 else "loop"
            sessions[f"queue client, {name}"] = c.open_session(fp, torch.float32, retry=NO_FAILOVER)
            open_msg = pb.SessionRequest(open=pb.OpenSession(
                fingerprint=fp.digest, config_digest=fp.config_digest, weights_digest=fp.weights_digest,
                trunk_start=fp.start, trunk_end=fp.end, client="wake_ab", refusals_in_stream=True,
            ))
            sessions[f"aio client, {name}"] = AioStream(c.address, open_msg)
        gen = torch.Generator().manual_seed(0)
        prefill = torch.randn(1, 16, hidden_size, generator=gen)
        for s in sessions.values():
            s.step(prefill, 0)
        over: dict[str, list[float]] = {k: [] for k in sessions}
        for i in range(args.steps + 3):  # the first 3 warm up
            x = torch.randn(1, 1, hidden_size, generator=gen)
            for name, s in sessions.items():
                t0 = time.perf_counter()
                _, compute = s.step(x, 16 + i)
                rtt = time.perf_counter() - t0
                if i >= 3:
                    over[name].append(rtt - (compute / 1e6 if isinstance(compute, int) else compute))
        for s in sessions.values():
            s.close()
        for c in clients.values():
            c.close()
    finally:
        stop(*daemons.values())
    print(f"{'variant':28} {'overhead p50 ms':>16} {'p90 ms':>8}   ({args.steps} one-token steps each, interleaved)")
    for name, v in over.items():
        v.sort()
        print(f"{name:28} {statistics.median(v) * 1e3:16.3f} {v[int(0.9 * len(v))] * 1e3:8.3f}")
    print(f"load average: {open('/proc/loadavg').read().split()[:3]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
