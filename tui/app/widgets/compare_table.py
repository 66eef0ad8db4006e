"""Full vs split figures side by side, with the split/full ratio."""

from __future__ import annotations

from rich.table import Table
from textual.widgets import Static

from ..comparison import CompareReport
from ..stats import (
    DraftFigures,
    fmt_bytes,
    fmt_ms,
    fmt_ratio,
    fmt_share,
    fmt_tokens_per_step,
    ratio,
    short_draft,
)


def compare_rows(r: CompareReport) -> list[tuple[str, str, str, str]]:
    """``(figure, full, split, split/full)`` rows; with a draft, its tokens per round trip (a
    step, for the full model) and acceptance too."""
    f, s = r.full, r.split
    rows = [
        ("TTFT", fmt_ms(f.ttft_s), fmt_ms(s.ttft_s), fmt_ratio(ratio(s.ttft_s, f.ttft_s))),
        ("per-token p50", fmt_ms(f.p50_s), fmt_ms(s.p50_s), fmt_ratio(ratio(s.p50_s, f.p50_s))),
        ("per-token p95", fmt_ms(f.p95_s), fmt_ms(s.p95_s), fmt_ratio(ratio(s.p95_s, f.p95_s))),
        ("tokens/s", f"{f.tokens_per_s:.1f}", f"{s.tokens_per_s:.1f}", fmt_ratio(ratio(s.tokens_per_s, f.tokens_per_s))),
        ("tokens", str(f.tokens), str(s.tokens), ""),
        ("wire bytes/token", "—", fmt_bytes(s.bytes_per_token), ""),
    ]
    if r.draft != "off":
        df = DraftFigures.of_result(r.draft, r.comparison.full)
        ds = DraftFigures.of_result(r.draft, r.comparison.split)
        rows += [
            (f"tokens/trip ({short_draft(r.draft)})", fmt_tokens_per_step(df.tokens_per_step),
             fmt_tokens_per_step(ds.tokens_per_step), ""),
            ("draft accepted", fmt_share(df.accepted, df.drafted), fmt_share(ds.accepted, ds.drafted), ""),
        ]
    return rows


class CompareTable(Static):
    """The figures of a ``CompareReport``."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.rows: list[tuple[str, str, str, str]] = []

    def show(self, report: CompareReport) -> None:
        self.rows = compare_rows(report)
        t = Table(expand=True, box=None, padding=(0, 1), header_style="bold")
        t.add_column("", style="dim", no_wrap=True)
        for name in ("full (here)", "split", "split/full"):
            t.add_column(name, justify="right", no_wrap=True)
        for row in self.rows:
            t.add_row(*row)
        self.update(t)
