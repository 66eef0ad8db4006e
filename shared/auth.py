"""The bearer token both ends share, and the client's side of sending it.

The token travels as ``authorization: Bearer <token>`` metadata on every call. The daemon checks
it in one server interceptor (``splitlm.daemon.auth``); the client adds it with one channel
interceptor here, so every RPC (Info, Session, and any added later) carries it.
"""

from __future__ import annotations

import collections
import logging
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import grpc

from .errors import UsageError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from grpc import _CallFuture, _CallIterator  # names of grpc's stubs only

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")

log = logging.getLogger(__name__)

AUTH_METADATA_KEY = "authorization"
SCHEME = "Bearer "


def read_token(path: Path, key: str = "token_file") -> str:
    """The token in ``path``: its first line, stripped.

    Raises:
        UsageError: the file cannot be read, is empty, or holds a token that cannot travel in
            gRPC metadata (printable ASCII only).
    """
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode
    except OSError as e:
        raise UsageError(f"{key}: cannot read the token file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{key}: the token file {path} is not text") from None
    token = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not token:
        raise UsageError(f"{key}: the token file {path} is empty")
    if not all(33 <= ord(c) < 127 for c in token):
        raise UsageError(f"{key}: the token in {path} must be printable ASCII without spaces")
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        log.warning("the token file %s is readable by every user on this host; chmod 600 it", path)
    return token


def read_pem(path: Path, key: str) -> bytes:
    """A PEM file's bytes.

    Raises:
        UsageError: unreadable, or not PEM.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UsageError(f"{key}: cannot read {path}: {e.strerror or e}") from None
    if b"-----BEGIN " not in data:
        raise UsageError(f"{key}: {path} is not a PEM file (no -----BEGIN line)")
    return data


class _Details(
    collections.namedtuple(
        "_Details",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    """``grpc.ClientCallDetails`` with the token added to the metadata."""


class BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every call on a channel.

    Metadata rather than call credentials: it works on a unix socket or loopback TCP without TLS
    as well (gRPC refuses call credentials on an insecure channel).
    """

    def __init__(self, token: str) -> None:
        self._pair = (AUTH_METADATA_KEY, SCHEME + token)

    def _with_token(self, details: grpc.ClientCallDetails) -> _Details:
        metadata = [m for m in (details.metadata or ()) if m[0] != AUTH_METADATA_KEY]
        metadata.append(self._pair)
        return _Details(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    # every kind of call alike: the same details with the token, the request (or the iterator of
    # requests) passed on untouched; four methods only so that each carries its kind's types

    def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.ClientCallDetails, _Req], _CallFuture[_Resp]],
        client_call_details: grpc.ClientCallDetails,
        request: _Req,
    ) -> _CallFuture[_Resp]:
        return continuation(self._with_token(client_call_details), request)

    def intercept_unary_stream(
        self,
        continuation: Callable[[grpc.ClientCallDetails, _Req], _CallIterator[_Resp]],
        client_call_details: grpc.ClientCallDetails,
        request: _Req,
    ) -> _CallIterator[_Resp]:
        return continuation(self._with_token(client_call_details), request)

    def intercept_stream_unary(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Iterator[_Req]], _CallFuture[_Resp]],
        client_call_details: grpc.ClientCallDetails,
        request_iterator: Iterator[_Req],
    ) -> _CallFuture[_Resp]:
        return continuation(self._with_token(client_call_details), request_iterator)

    def intercept_stream_stream(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Iterator[_Req]], _CallIterator[_Resp]],
        client_call_details: grpc.ClientCallDetails,
        request_iterator: Iterator[_Req],
    ) -> _CallIterator[_Resp]:
        return continuation(self._with_token(client_call_details), request_iterator)
