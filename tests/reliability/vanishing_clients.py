"""A process of N clients that each open a session, send one step, read its reply, and then hang
on until the test kills the process with SIGKILL: no stream end, no goodbye, only the kernel
closing the sockets. Each client has its own connection.

Usage: python -m tests.reliability.vanishing_clients ADDRESS N
Prints ``ready N`` once every client has its reply.
"""

from __future__ import annotations

import array
import asyncio
import sys

import grpc

from splitlm.protos import trunk_pb2 as pb
from splitlm.protos import trunk_pb2_grpc as pb_grpc

OPTIONS = [("grpc.use_local_subchannel_pool", 1)]  # one connection per client, not a shared one


def open_request(p: pb.Plan, **override: object) -> pb.SessionRequest:
    """The OpenSession message for the daemon's ``p``, with fields in ``override`` replaced.

    Here rather than in ``helpers`` (which uses it too) so that this process stays free of torch."""
    fields: dict[str, object] = dict(
        fingerprint=p.fingerprint,
        config_digest=p.config_digest,
        weights_digest=p.weights_digest,
        trunk_start=p.trunk_start,
        trunk_end=p.trunk_end,
        client="tests/reliability",
    )
    fields.update(override)
    return pb.SessionRequest(open=pb.OpenSession(**fields))  # type: ignore[arg-type]


async def one_client(
    address: str, plan: pb.Plan, step: pb.SessionRequest, keep: list[object]
) -> bool:
    channel = grpc.aio.insecure_channel(address, options=OPTIONS)
    call = pb_grpc.TrunkStub(channel).Session()
    await call.write(open_request(plan, client="vanishing"))
    opened = await call.read()
    await call.write(step)
    result = await call.read()
    keep.append((channel, call))  # never closed: the process dies with them open
    return bool(opened.HasField("opened") and result.result.cached_length == 4)


async def main(address: str, n: int) -> None:
    async with grpc.aio.insecure_channel(address) as ch:
        plan = (await pb_grpc.TrunkStub(ch).Info(pb.InfoRequest(), timeout=30)).plan
    data = array.array("f", [((i % 17) - 8) / 16 for i in range(4 * plan.hidden_size)]).tobytes()
    step = pb.SessionRequest(
        step=pb.Step(
            step_id=1,
            position=0,
            hidden=pb.Tensor(dtype=pb.FLOAT32, shape=[1, 4, plan.hidden_size], data=data),
        )
    )
    keep: list[object] = []
    ok = await asyncio.gather(*(one_client(address, plan, step, keep) for _ in range(n)))
    print(f"ready {sum(ok)}", flush=True)
    await asyncio.sleep(3600)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
