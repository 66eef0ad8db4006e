"""Setup shared by the measurement scripts in scripts/ (not a script itself).

The scripts run as ``python scripts/x.py``, so this directory is ``sys.path[0]`` and they import
it as ``from _common import ...``. Nothing here imports torch at module level: a script sets
``OMP_WAIT_POLICY`` before torch is first imported (``load_full`` does it for the A/B scripts).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from splitlm.shared.launcher import OwnedDaemon


def median_ms(fn: Callable[[], object], n: int) -> float:
    """The median wall time of ``n`` calls of ``fn``, in milliseconds."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def ab_setup(doc: str | None, **ints: int) -> tuple[argparse.Namespace, Any, Any]:
    """What every in-process A/B script starts with: its options (--model, --threads, --rounds,
    then ``--NAME`` for each of ``ints``, an int defaulting to its value) parsed, and
    ``load_full``'s ``(model, full)`` for them."""
    ap = argparse.ArgumentParser(description=doc)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    for name, default in ints.items():
        ap.add_argument(f"--{name}", type=int, default=default)
    args = ap.parse_args()
    return args, *load_full(args.model, args.threads)


def load_full(model_name: str, threads: int) -> tuple[Any, Any]:
    """``(model, full)``: the loaded model and its full (all-layer) part in float32 on the CPU,
    with torch on ``threads`` threads and passive OpenMP waits."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    torch.set_num_threads(threads)
    from splitlm.shared import prepare
    from splitlm.shared.models import PartSpec, build_part

    model = prepare.load_model(model_name)
    full = build_part(model.source, model.family, PartSpec.full(model.num_layers), torch.float32, torch.device("cpu"))
    return model, full


def prompt_ids(n: int, vocab: int = 20000) -> list[int]:
    """A fixed synthetic prompt of ``n`` token ids (the same in every script and run)."""
    return [(37 * i + 11) % min(vocab, 20000) + 100 for i in range(n)]


@dataclass(frozen=True)
class Decode:
    """One timed greedy decode."""

    per_token_ms: float
    """Median latency of the decode steps after the first."""
    ttft_ms: float
    """The prefill."""
    tokens: list[int]
    logits: Any
    """The last step's logits."""


def timed_decode(part: Any, ids: list[int], tokens: int, step: Callable[..., Any] | None = None) -> Decode:
    """Prefill ``ids`` into a fresh cache of ``part``, then ``tokens`` greedy one-token steps, each
    ``step(x, position, cache)`` (default ``part.forward``), timed."""
    import torch

    step = step or part.forward
    cache = part.new_cache()
    t0 = time.perf_counter()
    logits = step(torch.tensor([ids]), 0, cache)
    ttft = time.perf_counter() - t0
    out, lat = [int(logits[0, -1].argmax())], []
    for i in range(tokens):
        t0 = time.perf_counter()
        logits = step(torch.tensor([[out[-1]]]), len(ids) + i, cache)
        lat.append(time.perf_counter() - t0)
        out.append(int(logits[0, -1].argmax()))
    return Decode(statistics.median(lat[1:]) * 1e3, ttft * 1e3, out, logits)


def start_daemon(
    model: str, address: str, log: Path | None, *extra: str, poll_s: float = 0.2, timeout_s: float = 300,
    program: list[str] | None = None,
) -> OwnedDaemon:
    """``splitlm-trunkd --model MODEL --listen ADDRESS *extra`` (``shared.launcher``, passive
    OpenMP waits unless the environment says otherwise), its output to ``log`` (None: discarded),
    returned once it answers; ``SystemExit`` if it exits first or does not answer in ``timeout_s``.
    ``program`` replaces ``splitlm-trunkd`` (an instrumented server taking the same flags)."""
    from splitlm.shared.launcher import DaemonStartError, OwnedDaemon

    d = OwnedDaemon(["--model", model, *extra], address=address, log_path=log, name="the daemon", program=program)
    try:
        d.start(timeout_s, poll_s=poll_s)
    except DaemonStartError as e:
        raise SystemExit(str(e)) from None
    return d


def stop(*daemons: OwnedDaemon | None, timeout_s: float | None = 30) -> None:
    """Stop the daemons started here (``None``: none was), ``timeout_s`` each (``None``: as long
    as it takes)."""
    for d in daemons:
        if d is not None:
            d.stop(timeout_s)
