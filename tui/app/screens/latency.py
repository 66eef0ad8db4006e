"""The last reply's latency: figures, a histogram and a per-token timeline."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import Label

from ..stats import DraftFigures, ReplyStats, fmt_bytes, fmt_ms, fmt_rate, fmt_share
from ..widgets.figures import Figures
from ..widgets.key_footer import KeyFooter
from ..widgets.latency_histogram import LatencyHistogram
from ..widgets.latency_timeline import LatencyTimeline
from ..widgets.status_bar import StatusBar

if TYPE_CHECKING:
    from ..app import SplitlmApp
    from ..engine import ReplyOutcome


def latency_rows(
    stats: ReplyStats, finish_reason: str = "", draft: DraftFigures | None = None
) -> list[tuple[str, str]]:
    """The stats view's figures: TTFT, percentiles, speed, bytes, the per-token split, and the
    round trips and what the draft saved of them."""
    own, trunk, wire = stats.mean_split_s()
    per = own + trunk + wire
    rows = [
        ("tokens", f"{stats.tokens}" + (f" ({finish_reason})" if finish_reason else "")),
        ("TTFT", fmt_ms(stats.ttft_s)),
        ("p50 / token", fmt_ms(stats.p50_s)),
        ("p95 / token", fmt_ms(stats.p95_s)),
        ("speed", fmt_rate(stats.tokens_per_s)),
        ("bytes/token", fmt_bytes(stats.bytes_per_token)),
        ("own machine", f"{fmt_ms(own, 2)} ({fmt_share(own, per)})"),
        ("trunk", f"{fmt_ms(trunk, 2)} ({fmt_share(trunk, per)})"),
        ("wire", f"{fmt_ms(wire, 2)} ({fmt_share(wire, per)})"),
        ("total", fmt_ms(stats.total_s, 0)),
    ]
    return rows + (draft.rows() if draft is not None else [])


class LatencyScreen(Screen[None]):
    """Where the last reply's time went.

    | Key | Action |
    | :- | :- |
    | escape | back to the chat |
    """

    BINDINGS = [Binding("escape", "app.back", "Back")]

    def __init__(self) -> None:
        super().__init__(id="latency-screen")

    @property
    def splitlm(self) -> SplitlmApp:
        return cast("SplitlmApp", self.app)

    def compose(self) -> ComposeResult:
        yield StatusBar()
        yield Label("Latency of the last reply (own machine · trunk · wire per token)", classes="screen-title")
        yield Label("No reply yet: send a prompt first.", id="latency-empty")
        yield Figures(columns=2, id="latency-figures")
        with Horizontal(id="latency-plots"):
            yield LatencyHistogram(id="latency-histogram")
            yield LatencyTimeline(id="latency-timeline")
        yield KeyFooter()

    def on_mount(self) -> None:
        self.watch(self.app, "replies", lambda _: self.show(self.splitlm.last_reply), init=True)

    def show(self, outcome: ReplyOutcome | None) -> None:
        self.query_one("#latency-empty").display = outcome is None
        if outcome is None:
            return
        stats = outcome.stats
        draft = DraftFigures.of_result(outcome.draft, outcome.result)
        self.query_one(Figures).show(latency_rows(stats, outcome.result.finish_reason, draft))
        self.query_one(LatencyHistogram).show(stats.per_token_s)
        self.query_one(LatencyTimeline).show(stats.timings)
