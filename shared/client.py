"""The gRPC client of the trunk daemon: ``Info`` and sessions.

Blocking API for the CLI and for Textual thread workers. A session is one bidirectional stream;
``step`` sends one request and waits for its reply, so a token costs one round trip.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from typing import TYPE_CHECKING

import grpc
import torch

from ..protos import trunk_pb2 as pb
from ..protos import trunk_pb2_grpc as pb_grpc
from . import codec
from .errors import DaemonUnreachable, TrunkError
from .version import __version__

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .plan import Fingerprint

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 256 * 2**20
"""Both ends set this explicitly: a 4k-token prefill of a 8192-wide model in float32 is 128 MiB."""

_CLOSE = object()


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
    ]


def _trunk_error(e: grpc.RpcError) -> TrunkError:
    code = e.code() if hasattr(e, "code") else None
    details = e.details() if hasattr(e, "details") else str(e)
    return TrunkError(code.name if code is not None else "UNKNOWN", details or "")


class TrunkClient:
    """A connection to one trunk daemon.

    Args:
        address: ``unix:/path`` or ``host:port``.
        source: where the address came from, for error messages ("--trunk", "SPLITLM_TRUNK"...).
        max_message_bytes: limit for messages in both directions.
        connect_timeout_s: how long ``info`` waits for the daemon to answer.
    """

    def __init__(
        self,
        address: str,
        *,
        source: str = "--trunk",
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        connect_timeout_s: float = 5.0,
    ) -> None:
        self.address = address
        self.source = source
        self.connect_timeout_s = connect_timeout_s
        self.channel = grpc.insecure_channel(address, options=channel_options(max_message_bytes))
        self.stub = pb_grpc.TrunkStub(self.channel)

    def unreachable(self, detail: str) -> DaemonUnreachable:
        return DaemonUnreachable(
            f"no trunk daemon answers at {self.address} (from {self.source}): {detail}\n"
            f"  start one:  splitlm-trunkd --model smollm2 --listen {self.address}\n"
            "  or point the client at one: --trunk ADDR or SPLITLM_TRUNK=ADDR\n"
            "  or run the whole model here without a daemon: --full"
        )

    def info(self) -> pb.InfoReply:
        """The daemon's plan and limits.

        Raises:
            DaemonUnreachable: nothing answered within the connect timeout.
        """
        try:
            return self.stub.Info(pb.InfoRequest(), timeout=self.connect_timeout_s, wait_for_ready=False)
        except grpc.RpcError as e:
            if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise self.unreachable(e.details() or e.code().name) from None
            raise _trunk_error(e) from None

    def open_session(self, fingerprint: Fingerprint, wire_dtype: torch.dtype) -> TrunkSession:
        """Open a session for the plan ``fingerprint``.

        Raises:
            TrunkError: the daemon refused (FAILED_PRECONDITION for a plan mismatch,
                RESOURCE_EXHAUSTED for a full session table).
        """
        return TrunkSession(self, fingerprint, wire_dtype)

    def close(self) -> None:
        self.channel.close()


class TrunkSession:
    """One open session: its stream, its step ids and the bytes it moved.

    Not thread-safe: one thread steps a session at a time.
    """

    def __init__(self, client: TrunkClient, fingerprint: Fingerprint, wire_dtype: torch.dtype) -> None:
        self.client = client
        self.wire_dtype = wire_dtype
        self.bytes_sent = 0
        self.bytes_received = 0
        self._ids = itertools.count(1)  # step ids; a fixed32 on the wire
        self._requests: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._closed = threading.Event()
        open_msg = pb.SessionRequest(
            open=pb.OpenSession(
                fingerprint=fingerprint.digest,
                config_digest=fingerprint.config_digest,
                weights_digest=fingerprint.weights_digest,
                trunk_start=fingerprint.start,
                trunk_end=fingerprint.end,
                wire_dtype=codec.PB_OF[wire_dtype],
                client=f"splitlm/{__version__}",
            )
        )
        self._responses: Iterator[pb.SessionReply] = client.stub.Session(self._request_iter())
        reply = self._exchange(open_msg)
        if not reply.HasField("opened"):
            raise TrunkError("INTERNAL", "the daemon answered the open with something else")
        self.session_id = reply.opened.session_id
        log.info("session %s opened on %s", self.session_id, client.address)

    def _request_iter(self) -> Iterator[pb.SessionRequest]:
        while True:
            item = self._requests.get()
            if item is _CLOSE:
                return
            yield item  # type: ignore[misc]

    def _exchange(self, req: pb.SessionRequest) -> pb.SessionReply:
        self.bytes_sent += req.ByteSize()
        self._requests.put(req)
        try:
            reply = next(self._responses)
        except grpc.RpcError as e:
            self._closed.set()
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                raise self.client.unreachable(e.details() or "connection lost") from None
            raise _trunk_error(e) from None
        except StopIteration:
            self._closed.set()
            raise TrunkError("UNAVAILABLE", "the daemon ended the session") from None
        self.bytes_received += reply.ByteSize()
        return reply

    def step(self, hidden: torch.Tensor, position: int) -> tuple[torch.Tensor, float]:
        """Send hidden states ``(1, t, H)`` for ``[position, position + t)``.

        Returns:
            The trunk's output ``(1, t, H)`` (in the wire dtype) and its compute time in seconds.
        """
        step_id = next(self._ids)
        req = pb.SessionRequest()
        req.step.step_id = step_id
        req.step.position = position
        codec.encode(hidden, self.wire_dtype, out=req.step.hidden)
        reply = self._exchange(req)
        result = reply.result
        if result.step_id != step_id:
            raise TrunkError("INTERNAL", f"reply for step {result.step_id}, expected {step_id}")
        return codec.decode(result.hidden), result.compute_us / 1e6

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            self._requests.put(_CLOSE)
