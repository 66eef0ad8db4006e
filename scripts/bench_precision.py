"""``--weights`` and ``--wire-dtype`` on SmolLM2: speed and greedy agreement with float32.

Starts one daemon per weight precision (``--threads 1``), then measures, interleaved (each round
runs every configuration once, in turn; medians over rounds):

- decode ms/token and tokens/s of the full model (``--full-threads``, default 2) and of the
  split (client ``--client-threads``, default 1, + daemon 1) at float32, bfloat16 and int8;
- greedy agreement with float32 over a set of prompts x ``--tokens``: % of positions with the
  same token and the position of the first divergence, for full and split at each precision and
  for the float32 split over a bfloat16 and a float16 wire (agreement against the exact wire);
- wire bytes per generated token for each wire dtype.

Usage: ``python scripts/bench_precision.py [--rounds 5] [--tokens 64] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from splitlm.shared import prepare
from splitlm.shared.client import TrunkClient
from splitlm.shared.failover import NO_FAILOVER
from splitlm.shared.generation import GenerationSettings, generate, prompt_ids

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.conftest import start_daemon  # noqa: E402  (a real daemon process, waited for)

log = logging.getLogger(__name__)

PROMPTS = [
    "Explain how a bicycle stays upright.",
    "Write a short poem about the sea.",
    "What is the capital of France, and why is it famous?",
    "List three uses of baking soda.",
    "Describe the water cycle for a child.",
    "How do I sort a list in Python?",
    "Give me a recipe for pancakes.",
    "Why is the sky blue?",
]
PRECISIONS = ("float32", "bfloat16", "int8")
CPU = torch.device("cpu")


def _agreement(ref: list[int], got: list[int]) -> tuple[float, int | None]:
    n = len(ref)
    same = sum(a == b for a, b in zip(ref, got))
    first = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), None)
    if first is None and len(got) != n:
        first = min(n, len(got))
    return same / n, first


class _Fresh:
    """A split pipeline opened for each generation and closed after it."""

    def __init__(self, parts: prepare.SplitParts, client: TrunkClient, wire: torch.dtype | None) -> None:
        self.parts, self.client, self.wire = parts, client, wire
        self.bytes_sent = self.bytes_received = 0

    def run(self, tokenizer, ids: list[int], settings: GenerationSettings):  # type: ignore[no-untyped-def]
        pipe = prepare.split_pipeline(self.parts, self.client, wire_dtype=self.wire, retry=NO_FAILOVER)
        try:
            res = generate(pipe, tokenizer, ids, settings, [])
        finally:
            pipe.close()
        self.bytes_sent += res.bytes_sent
        self.bytes_received += res.bytes_received
        return res

    def close(self) -> None:
        pass


def _run(pipe, tokenizer, ids: list[int], settings: GenerationSettings):  # type: ignore[no-untyped-def]
    if isinstance(pipe, _Fresh):
        return pipe.run(tokenizer, list(ids), settings)
    return generate(pipe, tokenizer, list(ids), settings, [])


def main() -> None:  # noqa: C901, PLR0915 — a linear script
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--timing-tokens", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--full-threads", type=int, default=2)
    ap.add_argument("--client-threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated (float32 first)")
    a = ap.parse_args()
    precisions = tuple(a.precisions.split(","))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    warnings.simplefilter("ignore")
    tmp = Path(tempfile.mkdtemp(prefix="bench_precision."))
    model = prepare.load_model("smollm2")
    daemons, clients, full, split, wires = {}, {}, {}, {}, {}
    # a pipeline is a session per generation (``_Fresh``): a session left idle for minutes while
    # the other configurations run is dropped by the daemon's ping policy (see the report)
    try:
        for p in precisions:
            daemons[p] = start_daemon("smollm2", f"unix:{tmp / p}.sock", tmp / f"{p}.log", "--weights", p)
            clients[p] = TrunkClient(daemons[p].address)
            parts = prepare.split_parts(model, clients[p].info(), CPU)
            split[p] = _Fresh(parts, clients[p], None)
            full[p] = prepare.full_pipeline(model, torch.float32, CPU, weights=p)
            if p == "float32":
                for w in (torch.bfloat16, torch.float16):
                    wires[str(w).removeprefix("torch.")] = _Fresh(parts, clients[p], w)
        configs = {**{f"full/{p}": full[p] for p in precisions}, **{f"split/{p}": split[p] for p in precisions}}
        threads = {k: a.full_threads if k.startswith("full") else a.client_threads for k in configs}
        ids0 = prompt_ids(model.tokenizer, PROMPTS[0], chat=True)
        for k, pipe in configs.items():  # warm-up
            torch.set_num_threads(threads[k])
            _run(pipe, model.tokenizer, ids0, GenerationSettings(max_new_tokens=4))
        per_round: dict[str, list[float]] = {k: [] for k in configs}
        for r in range(a.rounds):
            for k, pipe in configs.items():
                torch.set_num_threads(threads[k])
                res = _run(pipe, model.tokenizer, ids0, GenerationSettings(max_new_tokens=a.timing_tokens))
                per_round[k].append(statistics.median(res.per_token_s) * 1e3)
            log.info("round %d: %s", r, {k: round(v[-1], 1) for k, v in per_round.items()})
        speed = {k: {"decode_ms_per_token": round(statistics.median(v), 2),
                     "tokens_per_s": round(1e3 / statistics.median(v), 1),
                     "rounds_ms": [round(x, 1) for x in v]} for k, v in per_round.items()}
        # agreement with float32 (full) and of half wires with the exact wire
        agree: dict[str, list[tuple[float, int | None]]] = {}
        wire_bytes: dict[str, list[float]] = {"float32": []}
        settings = GenerationSettings(max_new_tokens=a.tokens)
        for i, prompt in enumerate(PROMPTS):
            ids = prompt_ids(model.tokenizer, prompt, chat=True)
            outs = {}
            for k, pipe in {**configs, **{f"split/float32+wire-{w}": p for w, p in wires.items()}}.items():
                torch.set_num_threads(threads.get(k, a.client_threads))
                sent, recv = pipe.bytes_sent, pipe.bytes_received
                res = _run(pipe, model.tokenizer, ids, settings)
                outs[k] = res.token_ids
                if k.startswith("split/float32"):
                    w = k.rpartition("wire-")[2] if "wire-" in k else "float32"
                    moved = pipe.bytes_sent - sent + pipe.bytes_received - recv
                    wire_bytes.setdefault(w, []).append(moved / len(res.token_ids))
            ref = outs["full/float32"]
            for k, got in outs.items():
                if k == "full/float32":
                    continue
                base = outs["split/float32"] if "wire-" in k else ref
                agree.setdefault(k, []).append(_agreement(base, got))
            log.info("prompt %d: %s", i, {k: v[-1] for k, v in agree.items()})
        summary = {
            k: {"identical_tokens_pct": round(100 * statistics.mean(x for x, _ in v), 1),
                "identical_sequences": sum(f is None for _, f in v),
                "first_divergence": [f for _, f in v]}
            for k, v in agree.items()
        }
        doc = {
            "method": (f"SmolLM2-135M-Instruct GGUF, CPU, greedy; speed: {a.rounds} interleaved rounds of "
                       f"{a.timing_tokens} tokens, median of per-token decode latency per round, median "
                       f"over rounds; full at {a.full_threads} threads, split client {a.client_threads} "
                       f"+ daemon 1 thread; agreement: {len(PROMPTS)} chat prompts x {a.tokens} tokens "
                       "(wire rows against the exact-wire float32 split, others against full float32); "
                       "machine shared with other jobs"),
            "speed": speed,
            "agreement_vs_float32": summary,
            "wire_bytes_per_generated_token_incl_prompt": {k: round(statistics.mean(v)) for k, v in wire_bytes.items()},
        }
        text = json.dumps(doc, indent=1)
        print(text)
        if a.json:
            a.json.write_text(text)
    finally:
        for pipe in [*split.values(), *wires.values()]:
            pipe.close()
        for c in clients.values():
            c.close()
        for d in daemons.values():
            d.stop()


if __name__ == "__main__":
    main()
