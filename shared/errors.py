"""Domain errors of splitlm, and the one place that maps them to exit codes.

Each error carries a message written for the person at the terminal: what went wrong and, where
there is one, what to do about it. gRPC status codes for the daemon are mapped in
``splitlm.daemon.status``; exit codes for the CLIs here.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Exit codes of both CLIs."""

    OK = 0
    FAILURE = 1
    USAGE = 2


class SplitlmError(Exception):
    """Base of every error splitlm reports to a user without a traceback."""

    exit_code: ExitCode = ExitCode.FAILURE


class UsageError(SplitlmError):
    """A bad argument or option value."""

    exit_code = ExitCode.USAGE


class PlanError(UsageError):
    """A split plan outside the model's valid range."""


class ModelNotFound(SplitlmError):
    """``--model`` names nothing that can be loaded here."""


class UnsupportedModel(SplitlmError):
    """The model loads, but no splitlm family adapter knows its architecture."""


class DaemonUnreachable(SplitlmError):
    """No trunk daemon answered at the address the client looked at."""


class TrunkError(SplitlmError):
    """The daemon answered a session or step with an error status.

    Attributes:
        code: the gRPC status code name (``"FAILED_PRECONDITION"``, ...).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.details = message


class StepRefused(TrunkError):
    """The daemon refused one step before running it and kept the session open (the cache
    memory budget, the context limit, a rollback below what sliding windows keep)."""


class StepError(SplitlmError):
    """A step a part cannot run: wrong shape, dtype, position or size.

    Raised by the shared engine; the daemon maps the subclasses to INVALID_ARGUMENT,
    OUT_OF_RANGE and RESOURCE_EXHAUSTED.
    """


class InvalidStep(StepError):
    """The step's tensor does not fit the part (shape, dtype, byte length, empty)."""


class PositionError(StepError):
    """The step's position is past the cached length (a gap)."""


class ContextExhausted(StepError):
    """The step would take the session past its context limit."""

