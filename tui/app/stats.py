"""The chat app's latency figures: ``shared.stats`` (one percentile, one reply summary for every
face, re-exported here for the app's widgets) and how the app writes them. Pure: tested without a
UI.
"""

from __future__ import annotations

import math

from ...shared.stats import ReplyStats, TokenTiming, percentile, ratio

__all__ = [
    "ReplyStats", "TokenTiming", "fmt_bytes", "fmt_ms", "fmt_rate", "fmt_ratio", "fmt_share", "percentile", "ratio",
]


def fmt_ms(seconds: float, digits: int = 1) -> str:
    return "—" if math.isnan(seconds) else f"{seconds * 1e3:.{digits}f} ms"


def fmt_rate(per_s: float) -> str:
    return "—" if math.isnan(per_s) else f"{per_s:.1f} tok/s"


def fmt_ratio(x: float) -> str:
    return "—" if math.isnan(x) else f"{x:.2f}×"


def fmt_bytes(n: float) -> str:
    if math.isnan(n):
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def fmt_share(part: float, whole: float) -> str:
    return "—" if math.isnan(part) or not whole or math.isnan(whole) else f"{100 * part / whole:.0f}%"
