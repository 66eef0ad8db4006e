"""The shape of ``splitlm bench``'s summary: what ``report.summarise`` builds, ``--json`` writes to
results.json and the table, the Markdown and the plots read.

TypedDicts rather than dataclasses because the summary *is* JSON: it is written with
``json.dumps`` and read back by tests and readers of results.json, so at run time it stays plain
dicts and lists; these types let mypy check every key the report and the plots read. Keys that
are only there sometimes live in a ``total=False`` part (``NotRequired`` is Python 3.11+).
"""

from __future__ import annotations

from typing import Literal, TypedDict

from .floor import FloorSummary
from .peer import PeerSummary

Mode = Literal["full", "split"]
MODES: tuple[Mode, Mode] = ("full", "split")
"""The two ways a bench run generates: the whole model here, or bottom + top around the daemon."""


class PromptLengthFigures(TypedDict):
    """One prompt length of one mode (seconds)."""

    ttft_p50_s: float
    per_token_p50_s: float
    per_token_p95_s: float


class ModeSummary(TypedDict):
    """One mode over all its recorded runs; decode figures pool every prompt length (seconds).

    ``early_context``/``late_context`` are the shortest and longest prompt lengths (None with no
    runs); ``late_over_early`` is NaN with a single length. ``by_prompt_length`` is keyed by the
    length as a string (JSON object keys).
    """

    runs: int
    decode_tokens: int
    per_token_p50_s: float
    per_token_p95_s: float
    tokens_per_s: float
    client_compute_p50_s: float
    trunk_compute_p50_s: float
    overhead_p50_s: float
    overhead_p95_s: float
    early_context: int | None
    late_context: int | None
    early_p50_s: float
    late_p50_s: float
    late_over_early: float
    by_prompt_length: dict[str, PromptLengthFigures]


class AgreementSummary(TypedDict):
    """Greedy tokens of full and split, run against run (``shared.comparison``'s pooled measure)."""

    runs: int
    identical_runs: int
    tokens: int
    matching_tokens: int
    percent: float


class WireSummary(TypedDict):
    """Bytes on the wire: per generated token (decode steps), per prompt token (by prompt length)."""

    per_generated_token: float
    per_generated_token_min: float
    per_generated_token_max: float
    flat_in_context: bool
    payload_per_token: int
    framing_per_token: float
    per_prompt_token: dict[str, float]


class Memory(TypedDict, total=False):
    """Resident memory in bytes: the daemon's always (None when its monitor gave none); with
    ``--memory`` the full model's and the client parts' child processes, and a bare interpreter's."""

    daemon_rss_bytes: int | None
    full_rss_bytes: int
    client_rss_bytes: int
    baseline_rss_bytes: int


class _ConcurrencyFigures(TypedDict):
    aggregate_tokens_per_s: float
    per_session_tokens_per_s_p50: float
    wall_s: float
    tokens: int


class ConcurrencyFigures(_ConcurrencyFigures, total=False):
    """One mode at one number of concurrent sessions; ``scaling_vs_one`` when 1 session ran too."""

    scaling_vs_one: float


class ConcurrencyRow(TypedDict, total=False):
    """One number of concurrent sessions: each mode that ran, and split/full when both did."""

    full: ConcurrencyFigures
    split: ConcurrencyFigures
    ratio_aggregate: float


class _ChatFigures(TypedDict):
    ratio: float
    source: str


class ChatFigures(_ChatFigures, total=False):
    """P7's input (``--chat-json``, from ``scripts/bench_chat.py``): the app's tokens/s over
    headless ``generate``'s, and the app's own figures when the file had them."""

    app_tokens_per_s_median: float
    headless_tokens_per_s_median: float
    chat_tokens_per_s: float
    generate_tokens_per_s: float
    idle_cpu_percent_of_one_core: dict[str, float]
    idle_window_s: dict[str, float]
    client_threads: int


class Goal(TypedDict):
    """One of issue 6's goals P1-P8: ``value``/``passed`` are None when this run did not measure it."""

    id: str
    figure: str
    goal: str
    value: float | None
    passed: bool | None
    shown: str


class Summary(TypedDict):
    """The whole summary; ``ratios`` are split / full per figure (``ttft_<n>`` per prompt length);
    ``floor`` each decode figure over its bandwidth floor and ``peer`` llama.cpp on the same GGUF
    (None when not measured; ``peer_skipped`` says why)."""

    full: ModeSummary
    split: ModeSummary
    agreement: AgreementSummary
    wire: WireSummary
    memory: Memory
    concurrency: dict[str, ConcurrencyRow]
    chat: ChatFigures | None
    ratios: dict[str, float]
    goals: list[Goal]
    floor: FloorSummary | None
    peer: PeerSummary | None
    peer_skipped: str | None
