"""Typed messages from the app's workers to the UI thread.

Workers never touch widgets: they post one of these, and a handler on the UI thread updates the
widgets. Each message is immutable data, handled where it is posted and never bubbled (a token
costs one handler call, not one per ancestor).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from textual.message import Message

if TYPE_CHECKING:
    from ...shared.generation import TokenEvent
    from .comparison import CompareReport
    from .config import ChatSettings
    from .engine import PlanInfo, ReplyOutcome


class EngineProgress(Message, bubble=False):
    """Loading advanced: ``label`` is what happens now, ``step`` of ``total`` done."""

    def __init__(self, label: str, step: int, total: int) -> None:
        super().__init__()
        self.label, self.step, self.total = label, step, total


class EngineReady(Message, bubble=False):
    """The parts are loaded and a session is open."""

    def __init__(self, plan: PlanInfo) -> None:
        super().__init__()
        self.plan = plan


class EngineFailed(Message, bubble=False):
    """Loading or reconnecting failed; ``unreachable`` when no daemon answered."""

    def __init__(self, error: str, unreachable: bool) -> None:
        super().__init__()
        self.error, self.unreachable = error, unreachable


class ReplyToken(Message, bubble=False):
    """One generated token, with its text delta and timings."""

    def __init__(self, event: TokenEvent) -> None:
        super().__init__()
        self.event = event


class ReplyDone(Message, bubble=False):
    """The reply finished (end token, length, stop string or Esc)."""

    def __init__(self, outcome: ReplyOutcome) -> None:
        super().__init__()
        self.outcome = outcome


class ReplyFailed(Message, bubble=False):
    """The reply broke off; what streamed so far stays on screen.

    Attributes:
        unreachable: the daemon went away (the retry key reconnects).
    """

    def __init__(self, error: str, unreachable: bool) -> None:
        super().__init__()
        self.error, self.unreachable = error, unreachable


class Failover(Message, bubble=False):
    """The session lost its stream and is reconnecting, or has resumed (``shared.failover``)."""

    def __init__(self, event: Any) -> None:
        super().__init__()
        self.event = event


class ConnectionChanged(Message, bubble=False):
    """A daemon's state as its monitor feed sees it: connected, reconnecting or down; ``index``
    is the daemon's place in ``AppConfig.monitor_addresses``."""

    def __init__(self, state: str, detail: str, index: int = 0) -> None:
        super().__init__()
        self.state, self.detail, self.index = state, detail, index


class MonitorSampled(Message, bubble=False):
    """One ``MonitorSample`` from the daemon at ``index`` of ``AppConfig.monitor_addresses``."""

    def __init__(self, sample: Any, index: int = 0) -> None:
        super().__init__()
        self.sample, self.index = sample, index


class MonitorUnavailable(Message, bubble=False):
    """The daemon has no monitor stream."""

    def __init__(self, reason: str) -> None:
        super().__init__()
        self.reason = reason


class CompareProgress(Message, bubble=False):
    def __init__(self, label: str, step: int, total: int) -> None:
        super().__init__()
        self.label, self.step, self.total = label, step, total


class CompareDone(Message, bubble=False):
    def __init__(self, report: CompareReport) -> None:
        super().__init__()
        self.report = report


class CompareFailed(Message, bubble=False):
    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error


class DraftChecked(Message, bubble=False):
    """The settings screen's new draft was built (``error`` empty) or refused (why)."""

    def __init__(self, settings: ChatSettings, error: str) -> None:
        super().__init__()
        self.settings, self.error = settings, error
