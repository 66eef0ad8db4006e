"""``splitlm serve``: check the exposure, build the gateway on a connected split model, serve
with uvicorn until interrupted (Ctrl-C or SIGTERM, uvicorn's graceful stop), then close every
kept session.

The CLI (``tui.cli.cmd_serve``) calls ``check_exposure`` before anything heavy and connects the
model the way the other faces do (``prepare.split_parts`` / ``split_pipeline``), then hands it to
``serve``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...shared.errors import ExitCode, UsageError

if TYPE_CHECKING:
    from ...protos.splitlm.v1 import trunk_pb2 as pb
    from ...shared.client import TrunkClient
    from ...shared.prepare import LoadedModel, SplitParts
    from .sessions import Kept

log = logging.getLogger("splitlm.serve")


@dataclass(frozen=True)
class Exposure:
    """Where the gateway listens and who may call it.

    Attributes:
        host, port: the TCP address.
        loopback: only this machine can reach it.
        api_key: the key clients must send (None: no key asked).
    """

    host: str
    port: int
    loopback: bool
    api_key: str | None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    def describe(self) -> str:
        who = "this machine only (loopback)" if self.loopback else "the network (not loopback)"
        key = "an API key is required (Authorization: Bearer KEY)" if self.api_key else "no API key asked"
        return f"{self.url} reachable from {who}; {key}"


def check_exposure(listen: str, api_key_file: Path | None) -> Exposure:
    """The listen address and key, refused before anything loads.

    Raises:
        UsageError: a non-loopback address without ``--api-key-file`` (exit 2), a key file
            that cannot be read, or an address that cannot be bound (in use, not here).
    """
    from ...shared.auth import read_token
    from ...shared.paths import is_loopback

    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    loopback = is_loopback(listen)
    key = read_token(api_key_file, "api_key_file") if api_key_file is not None else None
    if not loopback and key is None:
        raise UsageError(
            f"serve: --listen {listen} is reachable beyond this machine: give --api-key-file PATH (a file "
            "holding the key clients must send as Authorization: Bearer KEY), or listen on loopback "
            "(127.0.0.1:PORT) and reach it through ssh -L"
        )
    _check_free(host, int(port), listen)
    return Exposure(host, int(port), loopback, key)


def _check_free(host: str, port: int, listen: str) -> None:
    """Bind the address once and let it go, so a port in use is said before the model loads.

    Raises:
        UsageError: it cannot be bound here.
    """
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(infos[0][4])
    except OSError as e:
        raise UsageError(f"serve: cannot listen at {listen}: {e.strerror or e}") from None


def reconnect_log(event: Any) -> None:
    """Failover notices in the server's log (a reply pauses, then continues)."""
    from ...shared.failover import Reconnecting

    if isinstance(event, Reconnecting):
        log.warning("lost the trunk daemon (%s); reconnecting in %.1f s (attempt %d)", event.error,
                    event.delay_s, event.attempt)
    else:
        log.warning("reconnected after %.1f s; replayed %d positions", event.downtime_s, event.replayed_positions)


def serve(
    args: Any, exposure: Exposure, model: LoadedModel, parts: SplitParts, info: pb.InfoReply,
    client: TrunkClient, open_session: Callable[[], Kept],
) -> int:
    """Serve until interrupted. ``open_session`` opens one trunk session with its drafter (on a
    request's thread); ``parts`` are the client's own (unserialised) parts, for the cache
    estimate.

    Returns:
        0 after a clean stop; 2 when the address cannot be bound.
    """
    import uvicorn

    from .app import Gateway
    from .engine import Engine, bytes_per_position
    from .metrics import GatewayMetrics
    from .protocol import Defaults
    from .sessions import SessionPool

    plan = parts.plan
    trunk_bytes = 2 if parts.trunk_dtype.itemsize == 2 else 4
    per_position = bytes_per_position(model.source.config, plan.end - plan.start,
                                      plan.num_layers - (plan.end - plan.start), trunk_bytes, trunk_bytes)
    max_sessions = min(args.serve_max_sessions, info.limits.max_sessions)
    if max_sessions < args.serve_max_sessions:
        log.warning("--max-sessions %d: the daemon holds at most %d sessions; using %d",
                    args.serve_max_sessions, info.limits.max_sessions, max_sessions)
    pool = SessionPool(open_session, max_sessions, args.keep_bytes, per_position)
    metrics = GatewayMetrics(pool)
    engine = Engine(model.tokenizer, model.eos_ids, model.source.model_id, pool,
                    info.limits.max_context, metrics, draft_max=args.draft_max)
    defaults = Defaults(max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                        top_k=args.top_k, seed=args.seed)

    def health() -> dict[str, Any]:
        reply = client.info()
        return {"model": reply.plan.model_id, "trunk": client.address, "sessions_open": reply.sessions_open}

    gateway = Gateway(engine, defaults, health, workers=max_sessions * 2 + 4)
    config = uvicorn.Config(
        gateway.app(exposure.api_key), host=exposure.host, port=exposure.port, log_level="warning",
        access_log=False, lifespan="off", timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    print(f"splitlm serve: {model.source.model_id} (split {plan.start}:{plan.end}, trunk at {client.address}) "
          f"on {exposure.describe()}; up to {max_sessions} trunk sessions, conversations kept within "
          f"{args.keep_bytes / 2**20:.0f} MiB (~{per_position} B a position); Ctrl-C stops",
          file=sys.stderr, flush=True)
    log.info("serving %s", exposure.describe())
    try:
        server.run()
    except SystemExit:  # uvicorn's own exit when it cannot bind (taken since the check above)
        if server.started:
            raise
    finally:
        pool.close()
        gateway.close()
    if not server.started:
        raise UsageError(f"serve: cannot listen at {exposure.host}:{exposure.port} (in use, or not an address here)")
    return ExitCode.OK
