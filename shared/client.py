"""The gRPC client of the trunk daemon: ``Info``, the monitor and sessions.

Blocking API for the CLI and for Textual thread workers. A session with the trunk is a
``RemoteSession``: either a ``TrunkStream`` (one bidirectional stream; ``step`` sends one request
and waits for its reply, so a token costs one round trip) or a ``FailoverSession``
(``splitlm.shared.failover``), which outlives its streams. Callers use the protocol, never the
concrete class. (The daemon's record of an open session is ``daemon.sessions.HeldSession``.)
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import threading
import time
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import grpc

from ..protos import trunk_pb2 as pb
from ..protos import trunk_pb2_grpc as pb_grpc
from .deadline import StepClock, StepDeadline, StepDeadlineExceeded, Watchdog
from .errors import DaemonUnreachable, StepRefused, TrunkError
from .replicas import (
    DNS_REPLICA_TRIES,
    REPLICA_ROUND_PAUSE_S,
    is_replica_set,
    replica_addresses,
    replica_target,
    service_config,
)
from .version import __version__

__all__ = ["TrunkClient", "TrunkStream", "RemoteSession", "MonitorStream", "replica_target"]

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    import torch

    from .config import ClientSettings
    from .failover import OnReconnect, RetryPolicy
    from .monitor import MonitorSample
    from .plan import Fingerprint

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 256 * 2**20
"""Both ends set this explicitly: a 4k-token prefill of a 8192-wide model in float32 is 128 MiB."""

_CLOSE = object()

KEEPALIVE_MS = 30_000
"""How often the client pings a connection; the daemon accepts pings this often (server.py)."""

CLOSE_WAIT_S = 2.0
"""How long closing a session waits for the daemon to end its stream before cancelling it."""

MONITOR_LATE_S = 10.0
"""How late past its interval a monitor sample may be before the stream counts as stalled."""

RECONNECT_BACKOFF_MAX_MS = 2_000
"""The longest a channel waits between connection attempts (= failover's default max delay)."""

REPLICA_REFUSALS = frozenset({"RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "UNAVAILABLE"})
"""A replica's answers to an open that another replica of the set may not give: its session
table is full, it serves another plan, it is shutting down. A new session on a replica set then
tries the next replica ``round_robin`` picks, up to once per replica."""


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # a daemon that stops answering (host gone, network dropped) is noticed within ~40 s,
        # even when the unanswered ping is a flow-control one (grpc's own default waits a minute)
        ("grpc.keepalive_time_ms", KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.ping_timeout_ms", 10_000),
        # keep pinging while a session sits idle (a user reading the reply): grpc stops after
        # two pings without data by default
        ("grpc.http2.max_pings_without_data", 0),
        # after a failed connect the channel waits before it tries again, growing to 120 s by
        # default: a daemon that restarted in 60 s was not seen for up to a minute more, failing
        # every reconnect in between fast (the kill -9 flake). Cap the wait at failover's own.
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MAX_MS),
    ]


_CODE_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}
"""Status code numbers (``StepRefused.code``) to names."""


def _trunk_error(e: grpc.RpcError) -> TrunkError:
    """The error of a failed call; an ``RpcError`` that is not a call (none of ours) is UNKNOWN."""
    if not isinstance(e, grpc.Call):
        return TrunkError("UNKNOWN", str(e))
    return TrunkError(e.code().name, e.details() or "")


@runtime_checkable
class RemoteSession(Protocol):
    """A session with the trunk daemon, as pipelines and front ends use it.

    ``TrunkStream`` (one stream; a break is an error) and ``FailoverSession`` (reconnects and
    replays on a break) both are one; ``TrunkClient.open_session`` picks which. Not thread-safe:
    one thread steps a session at a time; only ``cancel`` may come from another thread.
    """

    @property
    def session_id(self) -> str:
        """The daemon's id of the session (a failover session's changes on a resume)."""
        ...

    @property
    def wire_dtype(self) -> torch.dtype:
        """The dtype hidden states travel in, both ways."""
        ...

    @property
    def bytes_sent(self) -> int:
        """Bytes of requests sent so far (over every stream the session used)."""
        ...

    @property
    def bytes_received(self) -> int:
        """Bytes of replies received so far."""
        ...

    @property
    def rollback_floor(self) -> int:
        """The lowest position a step may start from (the daemon's sliding-window layers keep
        only so much); below it, a caller re-prefills from position 0."""
        ...

    def step(self, hidden: torch.Tensor, position: int) -> tuple[torch.Tensor, float]:
        """The trunk's output ``(1, t, H)`` for hidden states ``(1, t, H)`` at
        ``[position, position + t)``, and the daemon's compute time in seconds."""
        ...

    def cancel(self) -> None:
        """Stop a reconnect in progress (any thread); the stepping thread then gets an error.
        A session that never reconnects has nothing to stop."""
        ...

    def close(self) -> None:
        """End the session; the daemon frees its cache."""
        ...


class TrunkClient:
    """A connection to one trunk daemon.

    A target with several daemons (``ipv4:a:p,b:p``, ``unix:/a.sock,/b.sock``, ``dns:///name:port``;
    ``replica_target`` builds one) is a replica set of one stage: the channel uses gRPC's
    ``round_robin`` with health checking, so each new session goes to the next healthy replica
    and stays there for its life (see ``splitlm.shared.replicas``).

    Args:
        address: ``unix:/path`` or ``host:port`` (one daemon), or a replica set's target.
        source: where the address came from, for error messages ("--trunk", "SPLITLM_TRUNK"...).
        max_message_bytes: limit for messages in both directions.
        connect_timeout_s: how long ``info`` waits for the daemon to answer.
        token: bearer token sent with every call (the daemon's ``--token-file``).
        tls_ca: PEM certificate(s) to verify the daemon with; TCP addresses then use TLS.
        step_deadline: how long a session's open and steps may wait for their replies
            (``--step-deadline``); past it the stream is cancelled and the step fails with
            ``StepDeadlineExceeded`` (failover then reconnects and replays).
    """

    def __init__(
        self,
        address: str,
        *,
        source: str = "--trunk",
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        connect_timeout_s: float = 5.0,
        token: str | None = None,
        tls_ca: bytes | None = None,
        step_deadline: StepDeadline | None = None,
    ) -> None:
        from .auth import BearerToken
        from .paths import unix_path

        self.address = address
        self.source = source
        self.connect_timeout_s = connect_timeout_s
        self._settings = (max_message_bytes, token, tls_ca)  # for replica_set's copy of them
        self.step_deadline = step_deadline or StepDeadline()
        self.watchdog = Watchdog()  # one thread bounds every wait of this client's streams
        self.tls = tls_ca is not None and unix_path(address) is None
        self.replicas = is_replica_set(address)
        """Whether the target is a replica set (round_robin, health-checked), not one daemon."""
        options: list[tuple[str, int | str]] = [*channel_options(max_message_bytes)]
        if self.replicas:
            options.append(("grpc.service_config", service_config()))
        if self.tls:
            creds = grpc.ssl_channel_credentials(root_certificates=tls_ca)
            self.channel = grpc.secure_channel(address, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        if token:
            self.channel = grpc.intercept_channel(self.channel, BearerToken(token))
        self.stub = pb_grpc.TrunkStub(self.channel)

    @classmethod
    def from_settings(
        cls, settings: ClientSettings, source: str = "--trunk", address: str | None = None, **kwargs: float
    ) -> TrunkClient:
        """A client for ``address`` (default: the one address of ``settings.trunk``) with the
        settings' token file, CA and step deadline. Several ``--trunk`` addresses are a route:
        ``shared.route.from_settings``.

        Raises:
            UsageError: the token file or the CA file cannot be read, or ``settings.trunk``
                holds several addresses and ``address`` is None.
        """
        from .auth import read_pem, read_token
        from .errors import UsageError

        if address is None:
            if len(settings.trunk) != 1:
                raise UsageError(
                    f"this command talks to one trunk daemon; {len(settings.trunk)} --trunk addresses "
                    f"were given ({', '.join(settings.trunk)}): give one"
                )
            address = settings.trunk[0]

        token = read_token(settings.token_file) if settings.token_file else None
        ca = read_pem(settings.tls_ca, "tls_ca") if settings.tls_ca else None
        deadline = StepDeadline(floor_s=settings.step_deadline)
        return cls(
            address, source=source, token=token, tls_ca=ca, step_deadline=deadline,
            **kwargs,  # type: ignore[arg-type]
        )

    @classmethod
    def replica_set(cls, clients: Sequence[TrunkClient]) -> TrunkClient:
        """One client for daemons that serve the same stage (the route's replicas): its target
        is ``replica_target`` of their addresses, its settings (token, CA, step deadline,
        timeouts) the first client's. The given clients stay open; the caller closes them.

        Raises:
            UsageError: the addresses cannot form one target (see ``replica_target``).
        """
        first = clients[0]
        max_message_bytes, token, tls_ca = first._settings
        return cls(
            replica_target([c.address for c in clients]),
            source=first.source,
            max_message_bytes=max_message_bytes,
            connect_timeout_s=first.connect_timeout_s,
            token=token,
            tls_ca=tls_ca,
            step_deadline=first.step_deadline,
        )

    def unreachable(self, detail: str) -> DaemonUnreachable:
        from .paths import unix_path

        if self.replicas:
            return DaemonUnreachable(
                f"no replica of {self.address} answered (from {self.source}): {detail}\n"
                "  each replica is a splitlm-trunkd with the same model and split; one that is "
                "stopping reports NOT_SERVING and gets no sessions\n"
                "  or run the whole model here without a daemon: --full"
            )
        tls_hint = ""
        if unix_path(self.address) is None:
            tls_hint = (
                "  it may serve TLS: pass its certificate with --tls-ca (or SPLITLM_TLS_CA)\n" if not self.tls
                else "  check that it serves TLS with a certificate that --tls-ca vouches for\n"
            )
        return DaemonUnreachable(
            f"no trunk daemon answers at {self.address} (from {self.source}): {detail}\n"
            f"{tls_hint}"
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
            # the generated stub is untyped: its reply is Any to mypy
            reply: pb.InfoReply = self.stub.Info(
                pb.InfoRequest(), timeout=self.connect_timeout_s, wait_for_ready=False
            )
            return reply
        except grpc.RpcError as e:
            if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise self.unreachable(e.details() or e.code().name) from None
            raise _trunk_error(e) from None

    def monitor(self, interval_s: float = 1.0, late_s: float = MONITOR_LATE_S) -> MonitorStream:
        """Subscribe to the daemon's monitor: one sample per ``interval_s`` (0.25-10 s).

        Nothing is sent until the stream is iterated; errors surface from the iteration. A
        sample more than ``late_s`` past its interval ends the stream with ``DaemonUnreachable``
        (a daemon that stalls while answering pings; the caller reconnects).
        """
        return MonitorStream(self, interval_s, late_s)

    def open_session(
        self,
        fingerprint: Fingerprint,
        wire_dtype: torch.dtype,
        retry: RetryPolicy | None = None,
        on_reconnect: OnReconnect | None = None,
        client_weights: str = "",
    ) -> RemoteSession:
        """Open a session for the plan ``fingerprint``; ``client_weights`` names the precision of
        the bottom and top here, for the daemon's log (empty: the trunk's).

        With an enabled ``retry`` policy the session survives a broken stream (daemon killed or
        restarted, connection reset): see ``splitlm.shared.failover``. The first open is not
        retried: no daemon at all is an error at once.

        Raises:
            TrunkError: the daemon refused (FAILED_PRECONDITION for a plan mismatch,
                RESOURCE_EXHAUSTED for a full session table).
        """
        clock = StepClock(self.step_deadline)  # one per logical session: a resume keeps it

        def open_stream(timeout_s: float | None) -> TrunkStream:
            return self._open_stream(
                lambda: TrunkStream(
                    self, fingerprint, wire_dtype, open_timeout_s=timeout_s, clock=clock,
                    client_weights=client_weights,
                )
            )

        session = open_stream(None)
        if retry is None or not retry.enabled:
            return session
        from .failover import FailoverSession

        # on a replica set another replica is most likely READY already: the first reopen goes
        # at once (round_robin picks only READY, healthy replicas), the backoff only after it
        return FailoverSession(session, open_stream, retry, on_reconnect, retry_at_once=self.replicas)

    @property
    def replica_count(self) -> int | None:
        """Replicas in the target (1 for one daemon); None when only DNS knows (``dns:``)."""
        found = replica_addresses(self.address)
        return None if found is None else len(found)

    def _open_stream(self, open_one: Callable[[], TrunkStream]) -> TrunkStream:
        """``open_one()``; on a replica set, a replica that refuses the new session (full,
        another plan, stopping) passes it on to the next one round_robin picks, up to twice per
        replica (a replica still connecting is not in the rotation yet: the first round may
        miss it, so the second round starts after ``REPLICA_ROUND_PAUSE_S``), and the last
        refusal, naming every code, is raised."""
        per_round = self.replica_count or DNS_REPLICA_TRIES
        tries = 2 * per_round if self.replicas else 1
        refusals: list[str] = []
        for attempt in range(tries):
            if attempt and attempt % per_round == 0:
                time.sleep(REPLICA_ROUND_PAUSE_S)  # a replica still connecting joins the rotation
            try:
                return open_one()
            except (TrunkError, DaemonUnreachable) as e:
                code = e.code if isinstance(e, TrunkError) else "UNAVAILABLE"
                if attempt + 1 == tries or code not in REPLICA_REFUSALS:
                    if refusals and isinstance(e, TrunkError):
                        raise TrunkError(
                            e.code, f"{e.details} (no replica took the session: {len(refusals) + 1} "
                            f"tries, refused with {', '.join([*refusals, code])})",
                        ) from None
                    raise
                log.info("a replica of %s refused a new session (%s); trying the next", self.address, e)
                refusals.append(code)
        raise AssertionError("unreachable: the last try raises")  # pragma: no cover

    def close(self) -> None:
        self.watchdog.close()
        self.channel.close()


class MonitorStream:
    """The daemon's monitor samples, blocking, one per interval, for as long as it is iterated.

    ``cancel()`` may be called from any thread; the iteration then ends quietly.

    Raises (from the iteration):
        DaemonUnreachable: no daemon answers, it went away, it is shutting down, or a sample
            is more than ``late_s`` overdue.
        TrunkError: any other status, e.g. INVALID_ARGUMENT for an interval out of range.
    """

    def __init__(self, client: TrunkClient, interval_s: float, late_s: float = MONITOR_LATE_S) -> None:
        self.client = client
        self.interval_s = interval_s
        self.late_s = late_s
        self._cancelled = threading.Event()
        self._stalled = False
        self._call = client.stub.Monitor(pb.MonitorRequest(interval_s=interval_s), wait_for_ready=False)

    def _stall(self) -> None:  # on the watchdog's thread
        self._stalled = True
        self._call.cancel()

    def __iter__(self) -> Iterator[MonitorSample]:
        from .monitor import MonitorSample

        # the first sample may take a whole interval more (the sampler's first delta)
        bound = 2 * self.interval_s + self.late_s
        replies: Iterator[pb.MonitorSample] = iter(self._call)
        while True:
            handle = self.client.watchdog.arm(bound, self._stall)
            try:
                msg = next(replies)
            except StopIteration:
                break
            except grpc.RpcError as e:
                if self._stalled:
                    raise self.client.unreachable(
                        f"no monitor sample within {bound:.1f} s; the daemon may be stalled"
                    ) from None
                if self._cancelled.is_set() and e.code() == grpc.StatusCode.CANCELLED:
                    return
                if e.code() == grpc.StatusCode.UNAVAILABLE:
                    raise self.client.unreachable(e.details() or "connection lost") from None
                raise _trunk_error(e) from None
            finally:
                self.client.watchdog.disarm(handle)  # only waiting for the daemon is bounded
            yield MonitorSample.from_pb(msg)
            bound = self.interval_s + self.late_s
        if not self._cancelled.is_set():
            raise self.client.unreachable("the daemon ended the monitor stream")

    def cancel(self) -> None:
        self._cancelled.set()
        self._call.cancel()


class TrunkStream:
    """A session on one stream: its step ids and the bytes it moved; a ``RemoteSession``.

    The stream breaking ends it (``FailoverSession`` reopens one and replays onto it).

    Every wait for a reply is bounded: the open by the step deadline's floor, a step (or a
    pipelined replay) by ``clock.budget`` of its positions. Past it the stream is cancelled and
    ``StepDeadlineExceeded`` raised, so a daemon that stalls while answering keepalive pings
    cannot hang the client.

    Not thread-safe: one thread steps a session at a time.

    Args:
        client: the daemon's connection.
        fingerprint: the plan the session is for.
        wire_dtype: the dtype hidden states travel in.
        open_timeout_s: bound for the open's reply (failover passes what is left of its deadline);
            never longer than the step deadline's floor.
        clock: the session's observed step latency (shared by a failover session's streams).
    """

    def __init__(
        self,
        client: TrunkClient,
        fingerprint: Fingerprint,
        wire_dtype: torch.dtype,
        open_timeout_s: float | None = None,
        clock: StepClock | None = None,
        client_weights: str = "",
    ) -> None:
        self.client = client
        self.fingerprint = fingerprint
        self.wire_dtype = wire_dtype
        self.clock = clock or StepClock(client.step_deadline)
        self.bytes_sent = 0
        self.bytes_received = 0
        self._ids = itertools.count(1)  # step ids; a fixed32 on the wire
        self._requests: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._close_sent = False
        from . import codec  # torch: only sessions need it, not info/monitor
        open_msg = pb.SessionRequest(
            open=pb.OpenSession(
                fingerprint=fingerprint.digest,
                config_digest=fingerprint.config_digest,
                weights_digest=fingerprint.weights_digest,
                trunk_start=fingerprint.start,
                trunk_end=fingerprint.end,
                weights="" if fingerprint.precision == "float32" else fingerprint.precision,
                wire_dtype=codec.PB_OF[wire_dtype],
                client=f"splitlm/{__version__}",
                refusals_in_stream=True,
                client_weights="" if client_weights == fingerprint.precision else client_weights,
            )
        )
        self._call = client.stub.Session(self._request_iter())
        self._done = threading.Event()  # set by gRPC when the call has ended, however it ended
        if not self._call.add_callback(self._done.set):
            self._done.set()
        self._responses: Iterator[pb.SessionReply] = self._call
        self._timed_out: tuple[float, str] | None = None  # (bound, what) once a bound expired
        self._send(open_msg)
        floor = self.clock.deadline.floor_s
        with self._bounded(floor if open_timeout_s is None else min(open_timeout_s, floor), "the open"):
            reply = self._receive()
        if not reply.HasField("opened"):
            raise TrunkError("INTERNAL", "the daemon answered the open with something else")
        self.session_id = reply.opened.session_id
        self.rollback_floor = 0
        """The lowest position a step may start from (the daemon's sliding-window layers keep
        only so much); below it, a caller re-prefills from position 0."""
        log.info("session %s opened on %s", self.session_id, client.address)

    def _request_iter(self) -> Iterator[pb.SessionRequest]:
        while True:
            item = self._requests.get()
            if item is _CLOSE:
                return
            yield item  # type: ignore[misc]

    @contextlib.contextmanager
    def _bounded(self, timeout_s: float, what: str) -> Iterator[None]:
        """Cancel the stream if the replies read inside take longer than ``timeout_s`` in all;
        ``_receive`` then raises ``StepDeadlineExceeded`` naming ``what`` and the bound."""

        def expire() -> None:  # on the watchdog's thread
            self._timed_out = (timeout_s, what)
            self._call.cancel()

        handle = self.client.watchdog.arm(timeout_s, expire)
        try:
            yield
        finally:
            self.client.watchdog.disarm(handle)

    def _send(self, req: pb.SessionRequest) -> None:
        self.bytes_sent += req.ByteSize()
        self._requests.put(req)

    def _receive(self) -> pb.SessionReply:
        try:
            reply = next(self._responses)
        except grpc.RpcError as e:
            self.close()
            if self._timed_out is not None:
                raise self._overdue(*self._timed_out) from None
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                raise self.client.unreachable(e.details() or "connection lost") from None
            raise _trunk_error(e) from None
        except StopIteration:
            self.close()
            raise TrunkError("UNAVAILABLE", "the daemon ended the session") from None
        self.bytes_received += reply.ByteSize()
        return reply

    def _overdue(self, bound_s: float, what: str) -> StepDeadlineExceeded:
        return StepDeadlineExceeded(
            f"no reply within {bound_s:.1f} s to {what} from the trunk daemon at "
            f"{self.client.address}: it may be stalled or overloaded; gave up on this stream\n"
            f"  the bound: {self.clock.deadline.explain()}\n"
            "  a slow daemon that is still working: raise it with --step-deadline S "
            "(SPLITLM_STEP_DEADLINE, step_deadline in client.toml)"
        )

    def step(self, hidden: torch.Tensor, position: int) -> tuple[torch.Tensor, float]:
        """Send hidden states ``(1, t, H)`` for ``[position, position + t)``.

        Returns:
            The trunk's output ``(1, t, H)`` (in the wire dtype) and its compute time in seconds.

        Raises:
            StepDeadlineExceeded: no reply within the step's budget (the stream is then closed).
            DaemonUnreachable, TrunkError: the stream broke, or the daemon refused the step.
        """
        from . import codec

        req = pb.SessionRequest()
        req.step.step_id = next(self._ids)
        req.step.position = position
        codec.encode(hidden, self.wire_dtype, out=req.step.hidden)  # no copy of a big prefill
        self._send(req)
        result = self._await([req.step.step_id], int(hidden.shape[1]))[0]
        return codec.decode(result.hidden), result.compute_us / 1e6

    def step_tensor(self, hidden: pb.Tensor, position: int) -> pb.StepResult:
        """``step`` for hidden states already encoded in the wire dtype."""
        return self.replay([(hidden, position)])[0]

    def replay(
        self, steps: Sequence[tuple[pb.Tensor, int]], timeout_s: float | None = None
    ) -> list[pb.StepResult]:
        """Send ``(hidden, position)`` steps pipelined: all of them first, then read the replies.

        Costs the daemon's compute plus one round trip, not one round trip per step.

        Args:
            timeout_s: a tighter bound than the step budget (failover's remaining deadline).

        Raises:
            StepDeadlineExceeded: the replies were not all in within the bound.
        """
        ids = []
        positions = 0
        for hidden, position in steps:
            req = pb.SessionRequest()
            req.step.step_id = next(self._ids)
            req.step.position = position
            req.step.hidden.CopyFrom(hidden)
            self._send(req)
            ids.append(req.step.step_id)
            positions += int(hidden.shape[1]) if len(hidden.shape) > 1 else 1
        return self._await(ids, positions, timeout_s)

    def _await(
        self, ids: list[int], positions: int, timeout_s: float | None = None
    ) -> list[pb.StepResult]:
        """The replies of the steps ``ids`` (sent, ``positions`` in all), all within the step
        budget of their positions (one floor for the lot) or ``timeout_s`` if tighter; the time
        they took teaches the session's clock."""
        bound = self.clock.budget(positions)
        if timeout_s is not None:
            bound = min(bound, timeout_s)
        what = (
            f"step {ids[0]} ({positions} position{'s' if positions != 1 else ''})" if len(ids) == 1
            else f"a replay of {len(ids)} steps ({positions} positions)"
        )
        t0 = time.monotonic()
        with self._bounded(bound, what):
            results, refused = [], None
            for step_id in ids:  # every reply is read, so the stream stays in step after a refusal
                try:
                    results.append(self._result(step_id))
                except StepRefused as e:
                    refused = refused or e
        self.clock.observe(positions, time.monotonic() - t0)
        if refused is not None:
            raise refused
        return results

    def _result(self, step_id: int) -> pb.StepResult:
        """The reply to step ``step_id``.

        Raises:
            StepRefused: the daemon did not run the step; the session is open and as it was.
        """
        reply = self._receive()
        if reply.HasField("refused") and reply.refused.step_id == step_id:
            code = _CODE_NAMES.get(reply.refused.code, "UNKNOWN")
            raise StepRefused(code, reply.refused.message)
        if not reply.HasField("result") or reply.result.step_id != step_id:
            raise TrunkError("INTERNAL", f"reply for step {reply.result.step_id}, expected {step_id}")
        self.rollback_floor = reply.result.rollback_floor
        return reply.result

    def cancel(self) -> None:
        """Nothing to stop: a single stream never reconnects (see ``RemoteSession.cancel``)."""

    def close(self, wait_s: float = CLOSE_WAIT_S) -> None:
        """End the stream (the daemon frees the cache) and wait, at most ``wait_s``, for the
        daemon to finish it; a stream still open then is cancelled.

        Waiting matters: gRPC's own threads finish an open call, and a process that exits while
        they hold the call's lock deadlocks when the interpreter collects the call object at
        exit (a client that printed its whole reply and never exited).
        """
        if not self._close_sent:
            self._close_sent = True
            self._requests.put(_CLOSE)
        if not self._done.wait(wait_s):
            self._call.cancel()
            self._done.wait(wait_s)
