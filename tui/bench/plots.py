"""PNG plots of a bench run (matplotlib, Agg backend: no display needed).

Needs the ``bench`` extra (``pip install 'splitlm[bench]'``); without matplotlib ``--plots``
fails before anything is measured.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from ...shared.errors import UsageError
from .summary import MODES, Summary

log = logging.getLogger(__name__)

COLOURS = {"full": "#4c72b0", "split": "#dd8452"}


def check_available() -> None:
    """Raises ``UsageError`` when matplotlib is missing (``--plots`` needs it)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("--plots needs matplotlib: pip install 'splitlm[bench]'") from None


def write(summary: Summary, out_dir: Path, title: str) -> dict[str, Path]:
    """Write the plots; returns title -> file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}

    def save(fig: Any, name: str, label: str) -> None:
        path = out_dir / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files[label] = path

    lengths = [int(n) for n in summary["split"]["by_prompt_length"]]
    charts: tuple[tuple[Literal["ttft_p50_s", "per_token_p50_s"], str, str, str], ...] = (
        ("ttft_p50_s", "ttft.png", "Time to first token", "TTFT (ms)"),
        ("per_token_p50_s", "per_token.png", "Per-token latency vs context", "per-token latency p50 (ms)"),
    )
    for key, name, label, ylabel in charts:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for mode in MODES:
            by = summary[mode]["by_prompt_length"]
            ax.plot(lengths, [by[str(n)][key] * 1e3 for n in lengths], marker="o", label=mode,
                    color=COLOURS[mode])
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.minorticks_off()
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{label} — {title}")
        ax.grid(alpha=0.3)
        ax.legend()
        save(fig, name, label)

    fig, ax = plt.subplots(figsize=(6, 3.6))
    s = summary["split"]
    parts = [("client compute", s["client_compute_p50_s"]), ("trunk compute", s["trunk_compute_p50_s"]),
             ("overhead", max(0.0, s["overhead_p50_s"]))]
    left = 0.0
    for (name, value), colour in zip(parts, ("#55a868", "#c44e52", "#8172b2")):
        ax.barh(["split"], [value * 1e3], left=[left], color=colour, label=name)
        left += value * 1e3
    ax.barh(["full"], [summary["full"]["per_token_p50_s"] * 1e3], color=COLOURS["full"], label="full model")
    ax.set_xlabel("ms per generated token (p50)")
    ax.set_title(f"Where a token's time goes — {title}")
    ax.legend(fontsize=8)
    save(fig, "breakdown.png", "Per-token breakdown")

    conc = summary["concurrency"]
    if conc:
        ns = sorted(int(n) for n in conc)
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for mode in MODES:
            ys = [conc[str(n)].get(mode, {}).get("aggregate_tokens_per_s", float("nan")) for n in ns]
            ax.plot(ns, ys, marker="o", label=f"{mode}, aggregate", color=COLOURS[mode])
            ys = [conc[str(n)].get(mode, {}).get("per_session_tokens_per_s_p50", float("nan")) for n in ns]
            ax.plot(ns, ys, marker=".", linestyle="--", label=f"{mode}, per session", color=COLOURS[mode])
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.minorticks_off()
        ax.set_xlabel("concurrent sessions")
        ax.set_ylabel("tokens/s")
        ax.set_title(f"Concurrency — {title}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, "concurrency.png", "Concurrency")
    log.info("wrote %d plots to %s", len(files), out_dir)
    return files
