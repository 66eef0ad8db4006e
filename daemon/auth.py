"""Who may reach the daemon: the exposure rules checked at start, and the one token interceptor.

The rules (checked before any weights load, so a refusal is immediate):

- a unix socket (the default) is guarded by file permissions (the runtime dir and the umask);
- TCP on loopback (127.0.0.0/8, ::1, localhost) is allowed as it is;
- TCP on any other address needs TLS (``tls_cert`` + ``tls_key``) and a bearer token
  (``token_file``), or an explicit ``insecure`` that is logged as a warning at start.

When a token is configured, every RPC on every address must carry it, except the standard
health service (load balancers and probes do not hold tokens).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from ..shared.auth import AUTH_METADATA_KEY, SCHEME, read_pem, read_token
from ..shared.config import ConfigError, DaemonSettings
from ..shared.paths import is_loopback, unix_path

log = logging.getLogger(__name__)

UNAUTHENTICATED_PREFIXES = ("/grpc.health.v1.Health/",)
"""Methods answered without a token: health checks only."""


@dataclass(frozen=True)
class Security:
    """What the server enforces, read from the files named in the settings.

    Attributes:
        tls_cert: PEM certificate chain; with ``tls_key``, TCP addresses are served over TLS.
        tls_key: PEM private key.
        token: the bearer token every RPC but health must carry, or None.
        insecure: non-loopback TCP without TLS or a token was explicitly allowed.
    """

    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    token: str | None = None
    insecure: bool = False

    def __repr__(self) -> str:  # never log key or token
        token = "set" if self.token else "unset"
        return f"Security(tls={self.tls}, token={token}, insecure={self.insecure})"

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None and self.tls_key is not None

    def server_credentials(self) -> grpc.ServerCredentials:
        assert self.tls_cert is not None and self.tls_key is not None
        return grpc.ssl_server_credentials([(self.tls_key, self.tls_cert)])

    def add_port(self, server: grpc.aio.Server, address: str) -> int:
        """Listen on ``address``: TLS for TCP when configured, plain for unix sockets."""
        if self.tls and unix_path(address) is None:
            return server.add_secure_port(address, self.server_credentials())
        return server.add_insecure_port(address)

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [TokenAuth(self.token)] if self.token else []


def check_exposure(s: DaemonSettings, sources: Mapping[str, str]) -> Security:
    """Apply the exposure rules to the settings and read the files they name.

    Raises:
        ConfigError: a non-loopback TCP address without TLS and a token (and without
            ``insecure``), ``tls_cert`` without ``tls_key`` or the other way round, or a file
            that cannot be read. Exit code 2.
    """
    if (s.tls_cert is None) != (s.tls_key is None):
        given, missing = ("tls_cert", "tls_key") if s.tls_key is None else ("tls_key", "tls_cert")
        raise ConfigError(
            f"{given} (from {sources[given]}) needs {missing} too "
            "(--tls-cert and --tls-key go together)"
        )
    cert = read_pem(s.tls_cert, "tls_cert") if s.tls_cert else None
    key = read_pem(s.tls_key, "tls_key") if s.tls_key else None
    if key is not None and b"PRIVATE KEY" not in key:
        raise ConfigError(f"tls_key: {s.tls_key} holds no PEM private key")
    token = read_token(s.token_file) if s.token_file else None
    sec = Security(cert, key, token, s.insecure)
    exposed = [a for a in s.listen if not is_loopback(a)]
    if exposed and not (sec.tls and token):
        lacking = " and ".join(
            w
            for w, ok in (
                ("TLS (--tls-cert/--tls-key)", sec.tls),
                ("a token (--token-file)", token),
            )
            if not ok
        )
        where = ", ".join(exposed)
        if not s.insecure:
            raise ConfigError(
                f"refusing to listen on {where} (not loopback) without {lacking}: anyone "
                "who can reach that address could run the model and read the hidden states in "
                "the clear. Give --tls-cert, --tls-key and --token-file; or keep the unix socket "
                "(or 127.0.0.1) and let people in with `ssh -L`; or pass --insecure if this "
                "network is trusted"
            )
        log.warning(
            "INSECURE: listening on %s (not loopback) without %s, as --insecure (from %s) allows: "
            "anyone who can reach it can use this daemon and read what crosses the wire",
            where,
            lacking,
            sources["insecure"],
        )
    if sec.tls and all(unix_path(a) is not None for a in s.listen):
        log.warning(
            "tls_cert/tls_key are set, but every listen address is a unix socket: TLS is not used"
        )
    return sec


_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


def _deny(message: str) -> Callable[..., Awaitable[Any]]:
    async def abort(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return abort


class TokenAuth(grpc.aio.ServerInterceptor):
    """Lets an RPC through only with ``authorization: Bearer <token>`` (health excepted).

    The comparison is constant-time (``hmac.compare_digest``), so response timing does not leak
    how much of a guess was right.
    """

    def __init__(self, token: str) -> None:
        self._expected = (SCHEME + token).encode()

    def _authorized(self, metadata: tuple[tuple[str, str | bytes], ...] | None) -> bool | None:
        """True/False for a right/wrong token, None when none was sent."""
        for k, v in metadata or ():
            if k == AUTH_METADATA_KEY:
                got = v if isinstance(v, bytes) else v.encode("utf-8", "surrogateescape")
                return hmac.compare_digest(got, self._expected)
        return None

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[_Req, _Resp] | None]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[_Req, _Resp] | None:
        method = details.method or ""
        if method.startswith(UNAUTHENTICATED_PREFIXES):
            return await continuation(details)
        ok = self._authorized(details.invocation_metadata)
        if ok:
            return await continuation(details)
        log.warning("refused %s: %s token", method, "no" if ok is None else "a wrong")
        deny = _deny(
            "this daemon requires a bearer token: pass --token-file (or SPLITLM_TOKEN_FILE) "
            "with the daemon's token"
            if ok is None
            else "the bearer token is not this daemon's"
        )
        # answer in the method's own shape; an unknown method is refused too (no probing)
        handler = await continuation(details)
        if handler is None:
            return grpc.unary_unary_rpc_method_handler(deny)
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(deny)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(deny)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)
