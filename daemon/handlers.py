"""Registers the Trunk servicer so that bytes that are not a valid message get INVALID_ARGUMENT.

The generated ``add_TrunkServicer_to_server`` parses requests with ``FromString``; a message that
does not parse then surfaces as UNKNOWN with grpc's own traceback in the log, as if the daemon had
a bug. Here every method of ``splitlm.v1.Trunk`` (read from the descriptor, so a new RPC is covered
without touching this file) parses leniently: an undecodable message becomes a ``Malformed``
value, and the method is aborted with INVALID_ARGUMENT before the servicer sees it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from ..protos import trunk_pb2 as pb

log = logging.getLogger(__name__)

TRUNK = pb.DESCRIPTOR.services_by_name["Trunk"]


@dataclass(frozen=True)
class Malformed:
    """Stands in for a request whose bytes did not parse as ``type_name``."""

    type_name: str
    size: int
    error: str

    @property
    def message(self) -> str:
        return f"a {self.size}-byte message that is not a valid {self.type_name}: {self.error}"


def lenient_parser(cls: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except DecodeError as e:
            return Malformed(cls.DESCRIPTOR.full_name, len(data), str(e))

    return parse


async def _reject(request: Any, context: grpc.aio.ServicerContext[Any, Any], method: str) -> None:
    if isinstance(request, Malformed):
        log.warning("%s: %s", method, request.message)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)


def _checked_stream(
    requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any], method: str
) -> AsyncIterator[Any]:
    async def gen() -> AsyncIterator[Any]:
        async for request in requests:
            await _reject(request, context, method)
            yield request

    return gen()


def _handler(name: str, fn: Callable[..., Any], client_streaming: bool, server_streaming: bool,
             parse: Callable[[bytes], Any], serialize: Callable[[Any], bytes]) -> grpc.RpcMethodHandler[Any, Any]:
    if not client_streaming and not server_streaming:

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await _reject(request, context, name)
            return await fn(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, parse, serialize)
    if not client_streaming:

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            await _reject(request, context, name)
            async for reply in fn(request, context):
                yield reply

        return grpc.unary_stream_rpc_method_handler(unary_stream, parse, serialize)
    if not server_streaming:

        async def stream_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            return await fn(_checked_stream(requests, context, name), context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, parse, serialize)

    async def stream_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        async for reply in fn(_checked_stream(requests, context, name), context):
            yield reply

    return grpc.stream_stream_rpc_method_handler(stream_stream, parse, serialize)


def add_trunk_service(servicer: Any, server: grpc.aio.Server) -> None:
    """Register every method of ``splitlm.v1.Trunk`` that ``servicer`` implements."""
    handlers = {}
    for method in TRUNK.methods:
        request_cls = getattr(pb, method.input_type.name)
        reply_cls = getattr(pb, method.output_type.name)
        handlers[method.name] = _handler(
            f"{TRUNK.full_name}/{method.name}", getattr(servicer, method.name),
            method.client_streaming, method.server_streaming,
            lenient_parser(request_cls), reply_cls.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(TRUNK.full_name, handlers),))
