"""A measurement prototype of daemons forwarding to the next hop (issue 14, chained daemons).

Not a product feature: ``scripts/bench_hops.py`` starts it beside the daemons of a chain to
measure the alternative to client-driven hops. It serves the trunk's own gRPC ``Info`` and
``Session`` on ``--listen`` and forwards every step through the daemons given with ``--next`` (in
layer order, over their own gRPC streams on local sockets), so the client crosses its own
(slow) link once per step whatever the number of hops. Hidden states pass through as the wire
bytes they arrived in (no decode, no re-encode).

What it leaves out, on purpose, and what BENCHMARKS.md counts against it: failover of a hop
behind it (its hop sessions are plain streams: a hop that dies ends the client's session, which
then replays through the forwarder onto every hop, not only the one that died), TLS and tokens,
refusals in stream, and limits of its own.

    python scripts/chain_forwarder.py --listen unix:/tmp/f.sock --next unix:/tmp/a.sock --next unix:/tmp/b.sock
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc

from splitlm.protos import trunk_pb2 as pb
from splitlm.protos import trunk_pb2_grpc as pb_grpc
from splitlm.shared.client import (
    DEFAULT_MAX_MESSAGE_BYTES,
    TrunkClient,
    TrunkStream,
    channel_options,
)
from splitlm.shared.codec import TORCH_OF
from splitlm.shared.errors import SplitlmError
from splitlm.shared.plan import Fingerprint
from splitlm.shared.route import RouteClient

log = logging.getLogger("chain_forwarder")


class Forwarder(pb_grpc.TrunkServicer):  # type: ignore[misc]
    """``Info`` answers for the whole route; a ``Session`` opens one stream per hop and passes
    each step's hidden states through them in turn. Called on gRPC's worker threads."""

    def __init__(self, route: RouteClient) -> None:
        self.route = route
        self.info = route.info()

    def Info(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.InfoReply:  # noqa: N802
        return self.info

    def Session(  # noqa: N802
        self, requests: Iterator[pb.SessionRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.SessionReply]:
        first = next(requests)
        if not first.HasField("open") or first.open.fingerprint != self.info.plan.fingerprint:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the open's fingerprint is not the route's")
        r = self.route.route()
        o = first.open
        wire = TORCH_OF[o.wire_dtype] if o.wire_dtype else TORCH_OF[self.info.plan.dtype]
        hops: list[TrunkStream] = []
        try:
            for stage, client in zip(r.stages, self.route._stages):
                fp = Fingerprint(o.config_digest, o.weights_digest, stage.start, stage.end, o.weights or "float32")
                hops.append(TrunkStream(client, fp, wire))
            yield pb.SessionReply(opened=pb.SessionOpened(session_id="fwd:" + "+".join(h.session_id for h in hops),
                                                          plan=self.info.plan))
            for req in requests:
                hidden, position, compute_us, floor = req.step.hidden, req.step.position, 0, 0
                for hop in hops:
                    result = hop.step_tensor(hidden, position)
                    hidden, compute_us = result.hidden, compute_us + result.compute_us
                    floor = max(floor, result.rollback_floor)
                yield pb.SessionReply(result=pb.StepResult(
                    step_id=req.step.step_id, hidden=hidden, compute_us=compute_us,
                    cached_length=result.cached_length, rollback_floor=floor,
                ))
        except SplitlmError as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"a hop behind the forwarder failed: {e}")
        finally:
            for hop in hops:
                hop.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", required=True)
    ap.add_argument("--next", action="append", required=True, help="a hop's daemon, in layer order")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    route = RouteClient([TrunkClient(a) for a in args.next])
    try:
        servicer = Forwarder(route)
    except SplitlmError as e:
        print(f"chain_forwarder: {e}", file=sys.stderr)
        return 2
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8),
                         options=channel_options(DEFAULT_MAX_MESSAGE_BYTES))
    pb_grpc.add_TrunkServicer_to_server(servicer, server)
    server.add_insecure_port(args.listen)
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"chain_forwarder: {args.listen} -> {route.route().describe()}", file=sys.stderr, flush=True)
    stop.wait()
    server.stop(1).wait()
    route.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
