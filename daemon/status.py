"""The one place that maps domain errors to gRPC status codes. INTERNAL means a bug."""

from __future__ import annotations

import grpc

from ..shared.errors import ContextExhausted, InvalidStep, PositionError, SplitlmError


class SessionRefused(SplitlmError):
    """A session cannot be opened or continued; carries the gRPC code to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def code_for(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, SessionRefused):
        return exc.code
    if isinstance(exc, InvalidStep):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, PositionError):
        return grpc.StatusCode.OUT_OF_RANGE
    if isinstance(exc, ContextExhausted):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return grpc.StatusCode.INTERNAL
