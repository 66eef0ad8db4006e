"""The last minutes of monitor samples, for the server view's sparklines. Pure; UI thread."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any


class MonitorHistory:
    """A bounded window of ``MonitorSample``s, oldest first.

    Args:
        minutes: how much history the sparklines span.
        interval_s: the sampling interval (sizes the window).
    """

    def __init__(self, minutes: float = 5.0, interval_s: float = 1.0) -> None:
        self.samples: deque[Any] = deque(maxlen=max(2, int(minutes * 60 / max(interval_s, 0.05))))

    def add(self, sample: Any) -> None:
        self.samples.append(sample)

    @property
    def latest(self) -> Any | None:
        return self.samples[-1] if self.samples else None

    def series(self, value: Callable[[Any], float]) -> list[float]:
        return [float(value(s)) for s in self.samples]

    def gpu_series(self, index: int, value: Callable[[Any], float]) -> list[float]:
        """One GPU's values over the window (samples without that GPU count as 0)."""
        out = []
        for s in self.samples:
            gpu = next((g for g in s.gpus if g.index == index), None)
            out.append(float(value(gpu)) if gpu is not None else 0.0)
        return out

    def clear(self) -> None:
        self.samples.clear()
