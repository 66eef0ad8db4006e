"""Issue 13's additions to a bench run, kept out of ``run``'s wiring: the bandwidth floor (probe
and bytes per token, before the timed runs) and the peer (llama.cpp on the same GGUF, after them),
then their summaries from the bench's own samples.

Who calls: ``run`` on the main thread.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...shared.errors import SplitlmError, UsageError
from . import floor, peer

if TYPE_CHECKING:
    from ...shared.models import Part
    from .measure import RunSample
    from .options import BenchOptions

log = logging.getLogger(__name__)


def check_peer(opts: BenchOptions) -> None:
    """``--peer llama.cpp`` without llama-cpp-python: refused before anything loads.

    Raises:
        UsageError: with how to install it.
    """
    if opts.peer == "llama.cpp" and importlib.util.find_spec("llama_cpp") is None:
        raise UsageError(f"--peer llama.cpp: llama-cpp-python is not installed; {peer.INSTALL_HINT}")


def check_peer_model(opts: BenchOptions, source: object) -> None:
    """``--peer llama.cpp`` on a model llama.cpp cannot read: refused before the timed runs.

    Raises:
        UsageError: the model is not a GGUF file.
    """
    if opts.peer == "llama.cpp":
        reason = peer.missing_reason(getattr(source, "path", None), getattr(source, "kind", None))
        if reason is not None:
            raise UsageError(f"--peer llama.cpp: {reason}")


@dataclass(frozen=True)
class FloorInputs:
    """What the floor needs from before the runs: the probe and bytes per token per part."""

    bandwidth: floor.Bandwidth
    parts: dict[str, floor.DecodeBytes]


def floor_inputs(full: Part, start: int, end: int) -> FloorInputs | None:
    """Bytes per token of the full model, the client (bottom + top) and the trunk ``[start,
    end)``, from the full model's tensors; then the bandwidth probe at torch's thread count.
    None off the CPU: the probe measures host memory, which is not what a GPU reads from."""
    if full.device.type != "cpu":
        log.info("no bandwidth floor on %s: the probe measures the host's memory", full.device)
        return None
    parts = floor.split_bytes(full, start, end)
    return FloorInputs(floor.probe_bandwidth(), parts)


@dataclass(frozen=True)
class PeerRun:
    """The peer's recorded runs, or why there are none (``skipped``)."""

    samples: tuple[peer.PeerSample, ...] = ()
    version: str = ""
    threads: int = 0
    skipped: str | None = None


def peer_runs(
    opts: BenchOptions, source: object, prompts: dict[int, list[int]], threads: int, tick: Callable[[str], None]
) -> PeerRun:
    """llama.cpp on the model's GGUF with the bench's prompts, tokens, rounds and client threads,
    unless ``--peer off``; when it cannot run, a line on stderr says why (``auto``) or the run is
    refused (``llama.cpp``).

    Raises:
        UsageError: ``--peer llama.cpp`` and the model is not a GGUF file.
    """
    if opts.peer == "off":
        return PeerRun(skipped="--peer off")
    path = getattr(source, "path", None)
    reason = peer.missing_reason(path, getattr(source, "kind", None))
    if reason is not None:
        if opts.peer == "llama.cpp":
            raise UsageError(f"--peer llama.cpp: {reason}")
        print(f"splitlm bench: llama.cpp peer skipped: {reason}", file=sys.stderr, flush=True)
        return PeerRun(skipped=reason)
    try:
        samples, version = peer.run_peer(path, prompts, opts.new_tokens, opts.warmup, opts.repeats,  # type: ignore[arg-type]
                                         threads, tick)
    except (ValueError, RuntimeError, OSError) as e:  # llama.cpp could not load or run the file
        if opts.peer == "llama.cpp":
            raise SplitlmError(f"--peer llama.cpp: llama.cpp failed on {path}: {e}") from None
        print(f"splitlm bench: llama.cpp peer skipped: it failed on {path}: {e}", file=sys.stderr, flush=True)
        return PeerRun(skipped=f"llama.cpp failed on {path}: {e}")
    return PeerRun(tuple(samples), version, threads)


def summaries(
    inputs: FloorInputs | None, run: PeerRun, samples: Sequence[RunSample], source: object
) -> tuple[floor.FloorSummary | None, peer.PeerSummary | None]:
    """The floor and peer summaries from the bench's own recorded runs."""
    from .report import mode_summary

    full = mode_summary([s for s in samples if s.mode == "full"])
    split = mode_summary([s for s in samples if s.mode == "split"])
    floor_summary = None
    if inputs is not None:
        floor_summary = floor.summarise(inputs.bandwidth, inputs.parts, {
            "full_decode": ("full", full["per_token_p50_s"]),
            "split_decode": ("full", split["per_token_p50_s"]),
            "client_part": ("client", split["client_compute_p50_s"]),
            "trunk_part": ("trunk", split["trunk_compute_p50_s"]),
        })
    peer_summary = None
    if run.samples:
        full_tokens = {(s.round, s.prompt_len): s.token_ids for s in samples if s.mode == "full"}
        peer_summary = peer.summarise(run.samples, run.version, str(getattr(source, "path", "")), run.threads,
                                      full["per_token_p50_s"], split["per_token_p50_s"], full_tokens)
    return floor_summary, peer_summary
