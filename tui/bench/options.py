"""The options of ``splitlm bench``: argparse flags and the frozen settings they become.

Argument errors exit 2 with a message naming the flag (argparse's own ``error``); settings that
need the model to check (prompt lengths against its context) are checked in ``run``.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PROMPT_LENGTHS = (16, 64, 256, 512, 1024)
DEFAULT_CONCURRENCY = (1, 2, 4, 8, 16, 32)
QUICK_PROMPT_LENGTHS = (16, 512, 1024)
QUICK_CONCURRENCY = (1, 8)


MAX_LENGTH = 0
"""``max`` in ``--prompt-lengths``: the longest prompt the model's context holds with
``--new-tokens`` after it (resolved once the model is known)."""


def int_list(minimum: int, maximum: int, allow_max: bool = False) -> Callable[[str], tuple[int, ...]]:
    """An argparse ``type`` for ``16,64,256``: ascending-sorted unique ints in a range (and
    ``max``, as ``MAX_LENGTH``, when ``allow_max``)."""

    def parse(raw: str) -> tuple[int, ...]:
        items = [s.strip() for s in raw.split(",")]
        with_max = allow_max and "max" in items
        items = [s for s in items if not (allow_max and s == "max")]
        if with_max and not items:
            return (MAX_LENGTH,)
        if not raw.strip() or any(not s.lstrip("+").isdigit() for s in items):
            raise argparse.ArgumentTypeError(
                f"expected comma-separated integers such as 16,64,256; got {raw!r}"
            )
        values = sorted({int(s) for s in items})
        bad = [v for v in values if not minimum <= v <= maximum]
        if bad:
            raise argparse.ArgumentTypeError(
                f"{bad[0]} is out of range: each value must be {minimum}-{maximum}"
            )
        return ((MAX_LENGTH,) if with_max else ()) + tuple(values)

    return parse


def bounded_int(minimum: int, maximum: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {raw!r}") from None
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"must be {minimum}-{maximum}, got {value}")
        return value

    return parse


def kind_list(raw: str) -> tuple[str, ...]:
    """An argparse ``type`` for ``grounded,chat``: known prompt kinds, in the order given."""
    from .prompts import PROMPT_KINDS

    items = [s.strip() for s in raw.split(",")]
    bad = [s for s in items if s not in PROMPT_KINDS]
    if bad or not items:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated prompt kinds of {', '.join(PROMPT_KINDS)}; got {raw!r}"
        )
    return tuple(dict.fromkeys(items))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The bench's flags: the registry's (``shared.config``: the target, ``--model``, the
    precision, ``--threads``, ``--split``, ``--batch``, ``--concurrency``, ``--seed``,
    ``--json``) and its own."""
    from ...shared.config import add_flags

    p.add_argument("--prompt-lengths", type=int_list(1, 1 << 20, allow_max=True), default=None,
                   metavar="N,N,...",
                   help="prompt lengths in tokens (default 16,64,256,512,1024; lengths past the "
                   "model's context are dropped; max: the longest the context holds)")
    p.add_argument("--new-tokens", type=bounded_int(2, 4096), default=None, metavar="N",
                   help="tokens generated per run, greedy (default 32, link rows 64; --quick 16)")
    p.add_argument("--warmup", type=bounded_int(0, 100), default=None, metavar="N",
                   help="unrecorded rounds first (default 1)")
    p.add_argument("--repeats", type=bounded_int(1, 1000), default=None, metavar="N",
                   help="recorded rounds; full and split alternate within each (default 3; link rows and "
                   "--quick 1)")
    p.add_argument("--daemon-threads", type=bounded_int(1, 1024), default=None, metavar="N",
                   help="--threads of the daemon the bench starts (default: --threads when given, "
                   "else the daemon's default)")
    p.add_argument("--plots", type=Path, default=None, metavar="DIR", help="write PNG plots here")
    p.add_argument("--markdown", type=Path, default=None, metavar="PATH",
                   help="write the results section of BENCHMARKS.md")
    p.add_argument("--chat-json", type=Path, default=None, metavar="PATH",
                   help="P7: a JSON file with the chat app's tokens/s against headless generate")
    p.add_argument("--no-memory", action="store_true",
                   help="skip the resident-memory child processes")
    p.add_argument("--quick", action="store_true",
                   help="a short run (~2 min on SmolLM2): prompts 16,512,1024, 16 tokens, 1 round, "
                   "concurrency 1,8")
    p.add_argument("--prompt-kinds", type=kind_list, default=None, metavar="KIND,...",
                   help="link rows: the prompt kinds to measure, of grounded (summarise, quote or "
                   "edit a given text), chat (open questions), code (continue a source file) "
                   "(default: all three)")
    p.add_argument("--prompts", type=bounded_int(1, 3), default=None, metavar="N",
                   help="link rows: prompts per kind (default 2; --quick 1)")
    add_speed_arguments(p)
    add_flags(p, "bench")


@dataclass(frozen=True)
class BenchOptions:
    """What one ``splitlm bench`` run measures and where it writes.

    Attributes:
        model: the model spec (None: the daemon's with ``--trunk``, else smollm2).
        trunk: an existing daemon's address, or None to start one.
        split: trunk layers for the daemon the bench starts.
        prompt_lengths: prompts of exactly these many tokens.
        new_tokens: generated tokens per run (greedy).
        warmup, repeats: unrecorded and recorded rounds.
        concurrency: session counts for the concurrency rows.
        seed: torch's seed.
        dtype: compute dtype name or None (``auto``: the programs' default).
        weights: weight precision or None (``auto``: as ``dtype``; with ``trunk``, the daemon's).
        group_size: ``--group-size`` of int8/int4 weights.
        wire_dtype: wire dtype name or None (``exact``: the trunk's dtype).
        threads, daemon_threads: torch threads here / in the owned daemon, None for the default.
        json_path, plots, markdown, chat_json: outputs and the P7 input.
        memory: measure resident memory in child processes.
        quick: the short preset was asked for (recorded in the results).
        batch: start the daemon with cross-session batching.
        link_rtts: the link rows' round trips in seconds (0: a direct connection); None when
            no link rows were asked for.
        link_bandwidth: the relay's cap in bytes/s per direction (None: no cap).
        drafts: the drafts the link rows compare (``--draft`` spellings).
        draft_max: ``--draft-max``.
        prompt_kinds, prompts_per_kind: the link rows' prompts.
        load: session counts of the load rows (``--load``: ``tui.bench.load``); None: no load rows.
        load_steps, load_prompt, load_prefill: the load rows' recorded decode steps per session,
            prompt positions, and the concurrent long prefill's positions (0: none).
    """

    model: str | None
    trunk: str | None
    split: tuple[int, int] | None
    prompt_lengths: tuple[int, ...]
    new_tokens: int
    warmup: int
    repeats: int
    concurrency: tuple[int, ...]
    seed: int = 0
    dtype: str | None = None
    weights: str | None = None
    group_size: int = 32
    wire_dtype: str | None = None
    threads: int | None = None
    daemon_threads: int | None = None
    json_path: Path | None = None
    plots: Path | None = None
    markdown: Path | None = None
    chat_json: Path | None = None
    memory: bool = True
    quick: bool = False
    batch: bool = False
    link_rtts: tuple[float, ...] | None = None
    link_bandwidth: int | None = None
    drafts: tuple[str, ...] = ("off",)
    draft_max: int = 8
    prompt_kinds: tuple[str, ...] = ()
    prompts_per_kind: int = 2
    load: tuple[int, ...] | None = None
    load_steps: int = 32
    load_prompt: int = 16
    load_prefill: int = 0
    peer: str = "auto"
    precisions: tuple[str, ...] | None = None

    @property
    def link(self) -> bool:
        """Whether this run measures the link rows (drafts across RTTs) instead of the issue-6
        tables (full against split)."""
        return self.link_rtts is not None

    @classmethod
    def from_args(
        cls, args: argparse.Namespace, trunk: str | None, draft: str = "off", draft_given: bool = False
    ) -> BenchOptions:
        """Fill the defaults (``--quick`` or full) under what was given explicitly.

        The link rows run when ``--link-rtt``, ``--drafts``, ``--prompt-kinds`` or ``--prompts``
        is given, or ``--draft`` as a flag (``draft_given``); ``draft`` is the effective
        ``--draft`` setting (any layer), compared with ``off`` when ``--drafts`` is not given.
        """
        from .prompts import PROMPT_KINDS

        q = bool(args.quick)
        link_asked = draft_given or any(
            getattr(args, k, None) is not None for k in ("link_rtt", "drafts", "prompt_kinds", "prompts")
        )
        link_rtts = (args.link_rtt or (0.0,)) if link_asked else None
        drafts = args.drafts or tuple(dict.fromkeys(("off", draft)))
        opts = cls(
            model=args.model,
            trunk=trunk,
            split=args.split,
            prompt_lengths=args.prompt_lengths
            or (QUICK_PROMPT_LENGTHS if q else DEFAULT_PROMPT_LENGTHS),
            new_tokens=args.new_tokens or (16 if q else 64 if link_asked else 32),
            warmup=1 if args.warmup is None else args.warmup,
            repeats=args.repeats or (1 if q or link_asked else 3),
            concurrency=args.concurrency or (QUICK_CONCURRENCY if q else DEFAULT_CONCURRENCY),
            seed=0 if args.seed is None else args.seed,
            dtype=_unset(args.dtype, "auto"),
            weights=_unset(args.weights, "auto"),
            group_size=args.group_size,
            wire_dtype=_unset(args.wire_dtype, "exact"),
            threads=args.threads,
            daemon_threads=args.daemon_threads
            if args.daemon_threads is not None or trunk is not None
            else args.threads,
            json_path=args.json_path,
            plots=args.plots,
            markdown=args.markdown,
            chat_json=args.chat_json,
            memory=not args.no_memory,
            quick=q,
            batch=bool(args.batch),
            link_rtts=link_rtts,
            link_bandwidth=args.link_bandwidth,
            drafts=drafts,
            draft_max=int(getattr(args, "draft_max", None) or 8),
            prompt_kinds=args.prompt_kinds or PROMPT_KINDS,
            prompts_per_kind=args.prompts or (1 if q else 2),
            load=getattr(args, "load", None),
            load_steps=getattr(args, "load_steps", None) or 32,
            load_prompt=getattr(args, "load_prompt", None) or 16,
            load_prefill=getattr(args, "load_prefill", None) or 0,
        )
        return dataclasses.replace(opts, **_speed_options(args))  # type: ignore[arg-type]


def _unset(value: str | None, default: str) -> str | None:
    """A setting's value, None when it is the default (``auto``, ``exact``) or unset."""
    return None if value in (None, default) else value


PRECISION_PROMPT_LENGTHS = (16, 256)
"""``--precisions``' prompts unless ``--prompt-lengths`` is given: one short, one longer context."""


def precision_list(raw: str) -> tuple[str, ...]:
    """An argparse ``type`` for ``float32,bfloat16,int8``: known ``--weights`` values (the settings
    registry's list, so a precision added there is accepted here), in the order given."""
    from ...shared.config import WEIGHT_PRECISIONS

    items = [s.strip() for s in raw.split(",") if s.strip()]
    bad = [s for s in items if s not in WEIGHT_PRECISIONS]
    if bad or not items:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated precisions of {', '.join(WEIGHT_PRECISIONS)}; got {raw!r}"
        )
    return tuple(dict.fromkeys(items))


def add_speed_arguments(p: argparse.ArgumentParser) -> None:
    """Issue 13's flags: the peer measured in the same run, and the precision sweep."""
    from .peer import PEER_CHOICES

    p.add_argument("--peer", choices=PEER_CHOICES, default="auto",
                   help="llama.cpp decoding the same GGUF in the same run (P8): auto measures it when "
                   "llama-cpp-python is installed (make bench-peer), llama.cpp requires it, off skips it")
    p.add_argument("--precisions", type=precision_list, default=None, metavar="P,P,...",
                   help="instead of the full/split tables, a sweep of weight precisions (e.g. "
                   "float32,bfloat16,int8): per precision its own daemon, full, split and client "
                   "ms/token, memory, greedy agreement with float32 and each decode figure over its "
                   "bandwidth floor (default prompts 16,256, 32 tokens, 1 round)")


def _speed_options(args: argparse.Namespace) -> dict[str, object]:
    """``BenchOptions`` fields of ``add_speed_arguments``; a sweep's own defaults (few prompts,
    one round) under what was given explicitly."""
    precisions = getattr(args, "precisions", None)
    out: dict[str, object] = {"peer": getattr(args, "peer", None) or "auto", "precisions": precisions}
    if precisions:
        out["prompt_lengths"] = args.prompt_lengths or PRECISION_PROMPT_LENGTHS
        out["repeats"] = args.repeats or 1
        out["new_tokens"] = args.new_tokens or 32
    return out
