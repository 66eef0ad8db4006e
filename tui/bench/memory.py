"""Resident memory of the full model and of the split's client side, each in a fresh process.

``python -m splitlm.tui.bench.memory --part full|client ...`` loads what the bench would load
(the whole model, or bottom + top of the split) and prints one JSON object: ``rss_bytes`` after
loading and ``baseline_rss_bytes`` before (Python, torch and transformers imported). Measured in
children so the parts and caches of the bench process itself do not count, nor each other.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemoryRequest:
    """What a child loads: the model, the split (``client`` only), the weight precision
    (``float32``, ``bfloat16``, ``int8``...: what the bench's parts run with) and threads."""

    model: str
    split: tuple[int, int]
    weights: str = "float32"
    threads: int | None = None


def measure(part: str, req: MemoryRequest, timeout_s: float = 900.0) -> dict[str, int]:
    """Run one child and return its figures.

    Raises:
        RuntimeError: the child failed (its stderr's tail in the message).
    """
    cmd = [sys.executable, "-m", __name__, "--part", part, "--model", req.model,
           "--split", f"{req.split[0]}:{req.split[1]}"]
    cmd += ["--weights", req.weights]
    if req.threads:
        cmd += ["--threads", str(req.threads)]
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"memory child for {part} exited {r.returncode}: {r.stderr[-1500:]}")
    return {k: int(v) for k, v in json.loads(r.stdout.strip().splitlines()[-1]).items()}


def _child(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m splitlm.tui.bench.memory")
    ap.add_argument("--part", choices=["full", "client"], required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--split", required=True, metavar="A:B")
    ap.add_argument("--weights", default="float32")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    import psutil
    import torch
    import transformers  # noqa: F401  (counted in the baseline, as in every client)

    if args.threads:
        torch.set_num_threads(args.threads)
    from ...shared.models import PartSpec, build_parts, family_for, resolve, resolve_device
    from ...shared.models.precision import precision_named

    proc = psutil.Process()
    baseline = proc.memory_info().rss
    source = resolve(args.model)
    family = family_for(source.config)
    n = int(source.config.num_hidden_layers)
    a, b = (int(x) for x in args.split.split(":"))
    device = resolve_device("auto")
    precision = precision_named(args.weights, device)
    specs = [PartSpec.full(n)] if args.part == "full" else [PartSpec.bottom(a), PartSpec.top(b, n)]
    parts = build_parts(source, family, specs, precision.dtype, device, precision)
    rss = proc.memory_info().rss
    del parts
    print(json.dumps({"rss_bytes": rss, "baseline_rss_bytes": baseline}))
    return 0


if __name__ == "__main__":
    sys.exit(_child())
