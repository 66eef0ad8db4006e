"""How far greedy decoding with a draft agrees with plain greedy decoding, and why it differs.

A drafted run verifies several positions in one step; float32 sums over a chunk of positions are
not bit-identical to those of one-position steps, so where two tokens are nearly tied the argmax
may flip and the two replies part. This runs each prompt on the full model here twice, plain
greedy and greedy with a draft (``ngram`` by default), and reports the agreement and, at each
first divergence, the top-2 logit gap of the plain run at that position (a near-tie when small)
with the tokens each run chose. Split vs full with the same draft is exact (tested); this is the
other comparison the issue asks for. A measurement tool, not a test.

    .venv/bin/python scripts/draft_agreement.py --tokens 64 --json agreement.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import load_full

PROMPTS = (
    "Repeat this sentence word for word: the lighthouse keeper climbed the narrow stairs every "
    "evening to light the lamp for the ships.",
    "Summarise in one sentence: The river flooded the lower town twice this spring. The council "
    "voted to build a new wall along the river before the autumn rains.",
    "Fix the typo and print the corrected line only: def add(a, b): retrun a + b",
    "Rewrite in the past tense: I walk to the market, buy three apples and talk to the baker.",
    "List the colours in this text: the red door, the blue window and the green roof.",
    "Write two sentences about autumn.",
    "What is the capital of France, and why is it famous?",
    "Explain what a hash table is in simple words.",
    "Write a short Python function that returns the square of a number.",
    "Give me three tips for learning to play the guitar.",
)
"""Five input-grounded prompts (quote, summarise or edit a given text) and five open ones."""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=64, help="tokens per reply")
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"the first N of {len(PROMPTS)}")
    ap.add_argument("--draft", default="ngram", help="a --draft value (default ngram)")
    ap.add_argument("--draft-max", type=int, default=8)
    ap.add_argument("--json", help="write the per-prompt figures here")
    args = ap.parse_args()
    model, full = load_full(args.model, args.threads)
    import torch

    from splitlm.shared.draft.build import build_drafter
    from splitlm.shared.generation import (
        GenerationSettings,
        LocalPipeline,
        TokenEvent,
        generate,
        prompt_ids,
    )

    settings = GenerationSettings(max_new_tokens=args.tokens)

    def run(ids: list[int], draft: str | None) -> tuple[Any, list[Any], float]:
        """The reply, per generated token the logits row it was chosen from, and the CPU seconds
        per token (this process's: what a shared machine's other load inflates least)."""
        pipe = LocalPipeline(full)
        drafter = build_drafter(draft, model, torch.device("cpu")) if draft else None
        steps: list[Any] = []
        events: list[TokenEvent] = []
        inner = pipe.step

        def step(step_ids: Sequence[int], position: int, logits_for: int = 1) -> Any:
            out = inner(step_ids, position, logits_for)
            steps.append(out.logits)
            return out

        pipe.step = step  # type: ignore[method-assign]
        cpu0 = time.process_time()
        res = generate(pipe, model.tokenizer, ids, settings, model.eos_ids, on_token=events.append, drafter=drafter,
                       draft_max=args.draft_max)
        rows, first = [], {}
        for ev in events:  # token j of a step is chosen from that step's row j
            first.setdefault(ev.steps, ev.index)
            rows.append(steps[ev.steps - 1][ev.index - first[ev.steps]])
        cpu = (time.process_time() - cpu0) / max(1, len(res.token_ids))
        return res, rows, cpu

    records = []
    for n, prompt in enumerate(PROMPTS[: args.prompts]):
        ids = prompt_ids(model.tokenizer, prompt, chat=True)
        plain, plain_rows, plain_cpu = run(ids, None)
        drafted, drafted_rows, drafted_cpu = run(ids, args.draft)
        a, b = plain.token_ids, drafted.token_ids
        agree = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        rec: dict[str, Any] = {
            "prompt": n,
            "kind": "grounded" if n < 5 else "open",
            "tokens": len(a),
            "matching_prefix": agree,
            "identical": a == b,
            "steps": drafted.steps,
            "drafted": drafted.drafted,
            "accepted": drafted.accepted,
            "acceptance": drafted.acceptance,
            "tokens_per_step": round(drafted.tokens_per_step, 2),
            "plain_cpu_ms_per_token": round(plain_cpu * 1e3, 2),
            "drafted_cpu_ms_per_token": round(drafted_cpu * 1e3, 2),
        }
        # over the common prefix: how far verification rows are from one-position rows, and the
        # closest call plain decoding made (the smallest top-2 gap it passed through)
        same = range(agree)
        diffs = [float((drafted_rows[i].float() - plain_rows[i].float()).abs().max()) for i in same]
        gaps = [float(g[0] - g[1]) for g in (torch.topk(plain_rows[i].float(), 2).values for i in same)]
        rec["rows_not_bit_identical"] = sum(d > 0 for d in diffs)
        rec["max_abs_logit_diff"] = max(diffs, default=0.0)
        rec["min_plain_top2_gap"] = min(gaps, default=float("nan"))
        if a != b and agree < min(len(a), len(b)):
            top = torch.topk(plain_rows[agree].float(), 2)
            rec["divergence"] = {
                "index": agree,
                "plain_token": a[agree],
                "drafted_token": b[agree],
                "plain_top2": [int(i) for i in top.indices],
                "plain_top2_gap": float(top.values[0] - top.values[1]),
                "drafted_gap_of_the_two": float(drafted_rows[agree][b[agree]] - drafted_rows[agree][a[agree]]),
                "plain_logit_range": float(plain_rows[agree].max() - plain_rows[agree].min()),
            }
        records.append(rec)
        _print_row(rec, n == 0)
    _print_summary(records)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "threads": args.threads, "tokens": args.tokens,
                                               "draft": args.draft, "prompts": records}, indent=2) + "\n")
    return 0


def _print_row(rec: dict[str, Any], header: bool) -> None:
    if header:
        print(f"{'#':>2} {'kind':8} {'agree':>7} {'accept':>7} {'tok/step':>8} {'!bit':>4} {'max|dlog|':>9} "
              f"{'min gap':>8} {'cpu x':>6}  first divergence (plain top-2 gap)")
    acc = "-" if rec["acceptance"] is None else f"{rec['acceptance']:.0%}"
    div = rec.get("divergence")
    where = "identical" if rec["identical"] else (
        f"token {div['index']}: {div['plain_token']} vs {div['drafted_token']}, gap {div['plain_top2_gap']:.4f}"
        if div else "length differs")
    print(f"{rec['prompt']:>2} {rec['kind']:8} {rec['matching_prefix']:>3}/{rec['tokens']:<3} {acc:>7} "
          f"{rec['tokens_per_step']:>8.2f} {rec['rows_not_bit_identical']:>4} {rec['max_abs_logit_diff']:>9.2e} "
          f"{rec['min_plain_top2_gap']:>8.4f} {rec['drafted_cpu_ms_per_token'] / rec['plain_cpu_ms_per_token']:>6.2f}"
          f"  {where}", flush=True)


def _print_summary(records: list[dict[str, Any]]) -> None:
    total = sum(r["tokens"] for r in records)
    agree = sum(r["matching_prefix"] for r in records)
    gaps = [r["divergence"]["plain_top2_gap"] for r in records if "divergence" in r]
    drafted = sum(r["drafted"] for r in records)
    accepted = sum(r["accepted"] for r in records)
    print(f"identical replies {sum(r['identical'] for r in records)}/{len(records)}; tokens agreeing "
          f"(matching prefix) {agree}/{total} ({100 * agree / max(total, 1):.1f} %); "
          f"acceptance {accepted}/{drafted}")
    print(f"rows differing from one-position steps (in the common prefix): "
          f"{sum(r['rows_not_bit_identical'] for r in records)}/{agree}, largest logit difference "
          f"{max(r['max_abs_logit_diff'] for r in records):.2e}; smallest top-2 gap plain decoding passed "
          f"{min(r['min_plain_top2_gap'] for r in records):.4f}")
    for kind in ("grounded", "open"):
        rs = [r for r in records if r["kind"] == kind]
        if rs:
            ratio = sum(r["drafted_cpu_ms_per_token"] for r in rs) / sum(r["plain_cpu_ms_per_token"] for r in rs)
            print(f"{kind}: CPU per token with the draft / without: {ratio:.2f} (no link delay)")
    if gaps:
        print(f"top-2 logit gap at the first divergences: median {statistics.median(gaps):.4f}, "
              f"max {max(gaps):.4f}")


if __name__ == "__main__":
    raise SystemExit(main())
