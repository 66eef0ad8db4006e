"""Routes from plans: which daemons serve which trunk layers, as the client finds out itself.

The client is given one or more ``--trunk`` addresses. It asks every daemon for its plan (``Info``,
all at once, each bounded by the connect timeout) and builds the route from the answers:

- daemons that serve the same layer range are replicas of one *stage*;
- the stages, in layer order, must tile one range ``[a, b)`` with no gap and no overlap (a chain:
  ``splitlm-trunkd --split 2:15`` and ``--split 15:28``);
- every daemon must serve the same model at the same precision (config digest, weights digest,
  weight precision, compute dtype, family, layer count).

The route's range ``[first start, last end)`` is the trunk the client sees: its bottom and top
follow from it (``RouteClient.info`` answers like one daemon serving the whole range, so every
face of the client, generate, compare, chat, bench, ``generate --batch``, runs over a chain
unchanged). A session over the route is a ``ChainSession``: one session per stage (hop), each
opened with the fingerprint of its own range (the daemon checks it) and each its own
``FailoverSession`` recording its own inputs, so a hop that restarts is rebuilt by replay while
the others keep their caches, and tokens stay identical.

Client-driven hops (the client sends a step to hop 1, hands hop 1's output to hop 2, ...) rather
than daemons forwarding to each other: see BENCHMARKS.md "Chained daemons" for the figures.

One address is not a route: ``connect`` then returns a plain ``TrunkClient``, which behaves
exactly as before (same errors, same failover, same output).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..protos import trunk_pb2 as pb
from .errors import SplitlmError, UsageError
from .plan import Fingerprint

if TYPE_CHECKING:
    import torch

    from .client import MonitorStream, RemoteSession, TrunkClient
    from .config import ClientSettings
    from .failover import OnReconnect, RetryPolicy

log = logging.getLogger(__name__)


class RouteError(UsageError):
    """The daemons given do not make one route: a gap, an overlap, or a daemon serving another
    model or precision (exit 2: the addresses given are wrong, not the daemons)."""


@dataclass(frozen=True)
class Stage:
    """One layer range of the route and the daemons serving it.

    Attributes:
        start, end: the layers ``[start, end)`` this stage runs.
        addresses: its daemons (several: replicas of the stage), in the order given.
        info: the first daemon's answer to ``Info``.
    """

    start: int
    end: int
    addresses: tuple[str, ...]
    info: pb.InfoReply

    def __str__(self) -> str:
        return f"{self.start}:{self.end} at {', '.join(self.addresses)}"


@dataclass(frozen=True)
class Route:
    """The stages of a trunk, in layer order, tiling ``[start, end)``."""

    stages: tuple[Stage, ...]

    @property
    def start(self) -> int:
        return self.stages[0].start

    @property
    def end(self) -> int:
        return self.stages[-1].end

    @property
    def plan(self) -> pb.Plan:
        """The first daemon's plan (model, digests, precision: the same for every daemon)."""
        plan: pb.Plan = self.stages[0].info.plan
        return plan

    def fingerprint(self, start: int | None = None, end: int | None = None) -> Fingerprint:
        """The fingerprint of ``[start, end)`` (default: the whole route) for this model."""
        p = self.plan
        return Fingerprint(
            p.config_digest, p.weights_digest, self.start if start is None else start,
            self.end if end is None else end, p.weights or "float32",
        )

    def describe(self) -> str:
        """One line: ``2:15 at unix:/a -> 15:28 at unix:/b``."""
        return " -> ".join(str(s) for s in self.stages)

    def info(self) -> pb.InfoReply:
        """The route as one daemon serving ``[start, end)`` would describe itself.

        The plan is the first daemon's with the route's range and its fingerprint; limits are the
        tightest of all daemons (a session needs room on every hop); ``sessions_open`` is the
        largest of them; ``device`` lists each stage's.
        """
        out = pb.InfoReply()
        out.CopyFrom(self.stages[0].info)
        out.plan.trunk_start, out.plan.trunk_end = self.start, self.end
        out.plan.fingerprint = self.fingerprint().digest
        out.plan.device = ",".join(s.info.plan.device for s in self.stages)
        infos = [s.info for s in self.stages]
        out.limits.max_sessions = min(i.limits.max_sessions for i in infos)
        out.limits.max_context = min(i.limits.max_context for i in infos)
        out.limits.max_message_bytes = min(i.limits.max_message_bytes for i in infos)
        out.limits.rollback_depth = min(i.limits.rollback_depth for i in infos)
        out.sessions_open = max(i.sessions_open for i in infos)
        out.batching.enabled = all(i.batching.enabled for i in infos)
        return out


_SAME: tuple[tuple[str, Callable[[Any], str]], ...] = (
    ("model config digest", lambda p: p.config_digest),
    ("weights digest", lambda p: p.weights_digest),
    ("weight precision (--weights)", lambda p: p.weights or "float32"),
    ("compute dtype", lambda p: pb.DType.Name(p.dtype)),
    ("family", lambda p: f"{p.family}/{p.model_type}"),
    ("layer count", lambda p: str(p.num_layers)),
)
"""What every daemon of a route must agree on, in plain words, and how to read it off a plan."""


def build_route(answers: Sequence[tuple[str, pb.InfoReply]]) -> Route:
    """The route of the daemons at these addresses, from their answers to ``Info``.

    Args:
        answers: ``(address, Info reply)`` in the order the addresses were given.

    Raises:
        RouteError: a daemon serves another model or precision than the first (naming it and
            what differs), or the ranges leave a gap or overlap (naming ranges and addresses).
    """
    if not answers:
        raise RouteError("no trunk daemon given: pass --trunk ADDR (repeatable)")
    first_address, first = answers[0]
    for address, info in answers[1:]:
        diffs = [
            f"{what} {read(info.plan)} (at {first_address}: {read(first.plan)})"
            for what, read in _SAME if read(info.plan) != read(first.plan)
        ]
        if diffs:
            raise RouteError(
                f"the daemon at {address} does not serve the model the one at {first_address} "
                f"serves ({first.plan.model_id}, it serves {info.plan.model_id}): "
                f"{'; '.join(diffs)}; every daemon of a route must run the same model and "
                "precision (same --model, --weights and --dtype)"
            )
    ranges: dict[tuple[int, int], list[str]] = {}
    infos: dict[tuple[int, int], pb.InfoReply] = {}
    for address, info in answers:
        key = (int(info.plan.trunk_start), int(info.plan.trunk_end))
        if address in ranges.get(key, []):
            raise RouteError(f"--trunk {address} is given twice")
        ranges.setdefault(key, []).append(address)
        infos.setdefault(key, info)
    stages = tuple(
        Stage(a, b, tuple(ranges[(a, b)]), infos[(a, b)]) for a, b in sorted(ranges)
    )
    for prev, nxt in zip(stages, stages[1:]):
        if nxt.start > prev.end:
            raise RouteError(
                f"the trunk daemons leave a gap: layers {prev.end}:{nxt.start} are served by none "
                f"({prev}; {nxt}); start one with splitlm-trunkd --split {prev.end}:{nxt.start}"
            )
        if nxt.start < prev.end:
            raise RouteError(
                f"the trunk daemons overlap: layers {nxt.start}:{min(prev.end, nxt.end)} are served "
                f"twice ({prev}; {nxt}); daemons of a chain serve consecutive ranges like "
                f"{prev.start}:{nxt.start} and {nxt.start}:{nxt.end}, replicas serve the same range"
            )
    return Route(stages)


def ask_each(clients: Sequence[TrunkClient]) -> list[pb.InfoReply | SplitlmError]:
    """Every daemon's ``Info`` or the error asking it, asked all at once (each bounded by its
    client's connect timeout), in the order of ``clients``."""

    def one(c: TrunkClient) -> pb.InfoReply | SplitlmError:
        try:
            return c.info()
        except SplitlmError as e:
            return e

    if len(clients) == 1:
        return [one(clients[0])]
    with ThreadPoolExecutor(max_workers=len(clients), thread_name_prefix="splitlm-info") as pool:
        return list(pool.map(one, clients))


def ask_plans(clients: Sequence[TrunkClient]) -> list[pb.InfoReply]:
    """Every daemon's ``Info`` (``ask_each``).

    Raises:
        DaemonUnreachable: a daemon did not answer (the first such address given, named).
        TrunkError: a daemon refused (e.g. UNAUTHENTICATED).
    """
    answers = ask_each(clients)
    for a in answers:
        if isinstance(a, SplitlmError):
            raise a
    return [a for a in answers if isinstance(a, pb.InfoReply)]


class ChainSession:
    """A session over a route: one session per hop, stepped in turn; a ``RemoteSession``.

    ``step`` sends the hidden states to hop 1, its output to hop 2, and so on; the client holds
    every hop's input, so each hop can be its own ``FailoverSession`` (recording the steps it was
    sent and replaying them onto a new session when its daemon comes back). A hop that fails
    for good ends the step with its error; the other hops' caches are then ahead, which the next
    step at the same position rolls back.

    Not thread-safe: one thread steps it; ``cancel`` may come from any thread.
    """

    def __init__(self, hops: Sequence[RemoteSession]) -> None:
        self.hops = tuple(hops)

    @property
    def session_id(self) -> str:
        return "+".join(h.session_id for h in self.hops)

    @property
    def wire_dtype(self) -> torch.dtype:
        return self.hops[0].wire_dtype

    @property
    def bytes_sent(self) -> int:
        """Bytes sent to every hop (the client sends each hop its input)."""
        return sum(h.bytes_sent for h in self.hops)

    @property
    def bytes_received(self) -> int:
        return sum(h.bytes_received for h in self.hops)

    @property
    def rollback_floor(self) -> int:
        return max(h.rollback_floor for h in self.hops)

    def step(self, hidden: torch.Tensor, position: int) -> tuple[torch.Tensor, float]:
        """Hidden states ``(1, t, H)`` through every hop in turn; the daemons' compute summed."""
        total = 0.0
        for hop in self.hops:
            hidden, seconds = hop.step(hidden, position)
            total += seconds
        return hidden, total

    def cancel(self) -> None:
        for hop in self.hops:
            hop.cancel()

    def close(self) -> None:
        for hop in self.hops:
            hop.close()


class RouteClient:
    """Several trunk daemons as one trunk: ``info`` and ``open_session`` as a ``TrunkClient``'s.

    Asks for the plans (and builds the route) once, on the first ``info``. Blocking, like
    ``TrunkClient``; the CLI and Textual thread workers call it.

    Args:
        clients: one client per address, in the order given.
        stage_client: the client of a stage with several replica addresses (from the
            addresses' own clients); default ``TrunkClient.replica_set``.
    """

    def __init__(
        self,
        clients: Sequence[TrunkClient],
        stage_client: Callable[[Sequence[TrunkClient]], TrunkClient] | None = None,
    ) -> None:
        self.clients = tuple(clients)
        self.address = " -> ".join(c.address for c in self.clients)
        if stage_client is None:
            from .client import TrunkClient

            stage_client = TrunkClient.replica_set
        self._stage_client = stage_client
        self._route: Route | None = None
        self._stages: list[TrunkClient] = []

    @property
    def step_deadline(self) -> Any:
        return self.clients[0].step_deadline

    def route(self) -> Route:
        """The route (asked for and checked on the first call).

        Raises:
            DaemonUnreachable: a daemon does not answer (named).
            RouteError: the daemons do not make one route.
        """
        if self._route is None:
            infos = ask_plans(self.clients)
            route = build_route([(c.address, i) for c, i in zip(self.clients, infos)])
            by_address = {c.address: c for c in self.clients}
            stages = []
            for stage in route.stages:
                if len(stage.addresses) == 1:
                    stages.append(by_address[stage.addresses[0]])
                else:
                    stages.append(self._stage_client([by_address[a] for a in stage.addresses]))
            self._route, self._stages = route, stages
            log.info("route: %s", route.describe())
        return self._route

    def info(self) -> pb.InfoReply:
        """The route as one daemon serving its whole range (``Route.info``)."""
        return self.route().info()

    def open_session(
        self,
        fingerprint: Fingerprint,
        wire_dtype: torch.dtype,
        retry: RetryPolicy | None = None,
        on_reconnect: OnReconnect | None = None,
        client_weights: str = "",
    ) -> RemoteSession:
        """A ``ChainSession``: one session per stage, each with its own range's fingerprint.

        Raises:
            UsageError: ``fingerprint`` is not for the route's range.
            TrunkError, DaemonUnreachable: a hop refused or did not answer (the hops already
                opened are closed).
        """
        route = self.route()
        if (fingerprint.start, fingerprint.end) != (route.start, route.end):
            raise UsageError(
                f"a session for layers {fingerprint.start}:{fingerprint.end} over a route serving "
                f"{route.start}:{route.end}"
            )
        hops: list[RemoteSession] = []
        try:
            for stage, client in zip(route.stages, self._stages):
                fp = Fingerprint(
                    fingerprint.config_digest, fingerprint.weights_digest, stage.start, stage.end,
                    fingerprint.precision,
                )
                hops.append(client.open_session(fp, wire_dtype, retry, on_reconnect, client_weights))
        except BaseException:
            for hop in hops:
                hop.close()
            raise
        return ChainSession(hops)

    def monitor(self, interval_s: float = 1.0, late_s: float | None = None) -> MonitorStream:
        """The first stage's daemon's monitor (the chat's server panel and the bench sample one
        daemon; ``splitlm monitor`` refuses several addresses)."""
        self.route()
        if late_s is None:
            return self._stages[0].monitor(interval_s)
        return self._stages[0].monitor(interval_s, late_s)

    def close(self) -> None:
        for c in {id(c): c for c in (*self.clients, *self._stages)}.values():
            c.close()


def connect(
    addresses: Sequence[str], make: Callable[[str], TrunkClient]
) -> TrunkClient | RouteClient:
    """The trunk at ``addresses``: a plain ``TrunkClient`` for one address (exactly as before),
    else a ``RouteClient`` over one client per address.

    Args:
        make: builds the client of one address (with the settings' token, CA, deadline).

    Raises:
        RouteError: no address, or one given twice.
    """
    if not addresses:
        raise RouteError("no trunk daemon given: pass --trunk ADDR (repeatable)")
    if len(addresses) == 1:
        return make(addresses[0])
    seen = set()
    for a in addresses:
        if a in seen:
            raise RouteError(f"--trunk {a} is given twice")
        seen.add(a)
    return RouteClient([make(a) for a in addresses])


def from_settings(settings: ClientSettings, source: str = "--trunk") -> TrunkClient | RouteClient:
    """The trunk of ``settings.trunk`` (``connect``), every address's client with the settings'
    token file, CA and step deadline; what every face of the client connects with.

    Raises:
        UsageError: the token or CA file cannot be read; an address given twice.
    """
    from .client import TrunkClient

    return connect(settings.trunk, lambda a: TrunkClient.from_settings(settings, source=source, address=a))
