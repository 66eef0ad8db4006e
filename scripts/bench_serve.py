"""`splitlm serve` figures (issue 15): what keeping conversations in the trunk saves, and what the
HTTP gateway costs per token.

One daemon; two gateways on it, started here: ``reuse`` (the default: sessions kept per prefix)
and ``fresh`` (``--keep-bytes 0``: every request steps its whole prompt on a session rolled back
to 0). Per round, interleaved (reuse, fresh, then the generate row):

- a 5-turn conversation on each gateway (each round's own first message; greedy, ``--turn-tokens``
  a reply), streamed with a plain HTTP client; TTFT is request sent to the first content chunk.
  Turn 1 of ``reuse`` can still reuse the chat template's fixed system prompt of an earlier
  conversation;
- one streamed reply of ``--reply-tokens`` on the ``reuse`` gateway, and ``splitlm generate --json``
  for the same prompt on the same daemon: decode tokens/s of each (after the first token), and
  the gateway's overhead per token (the difference of the median per-token times), and the
  gateway's own measure of it: ``splitlm_serve_token_delivery_seconds``, a streamed token's time
  from its sampling to its chunk sent (taken within the same run, so the host's load weighs less).

Medians over ``--rounds``; prints a table and writes JSON (``--json``).

    python scripts/bench_serve.py [--model smollm2] [--rounds 3] [--json docs/bench/serve.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import start_daemon, stop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.tui.serve.helpers import start_serve, stop_serve  # noqa: E402  (a gateway subprocess, waited for)

USER_TURNS = (
    "Name one planet of the solar system.",
    "Tell me one fact about it.",
    "How far is it from the Sun?",
    "What is it made of?",
    "Thank you. Summarise what you said in one sentence.",
)
LONG_PROMPT = "Write a long story about a dragon who learns to cook."


def stream(url: str, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    """One streamed greedy chat reply: its text, TTFT, token count and decode time."""
    import httpx

    body = {"model": "m", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    text, tokens = "", 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
            for ch in obj["choices"]:
                delta = ch["delta"].get("content") or ""
                if delta:
                    now = time.perf_counter()
                    first = first if first is not None else now
                    last = now
                    text += delta
    assert first is not None and last is not None, "no content streamed"
    return {"text": text, "ttft_s": first - t0, "tokens": tokens, "decode_s": last - first}


def conversation(url: str, round_no: int, turn_tokens: int) -> list[float]:
    """TTFT of each turn of a 5-turn conversation (each turn resends all of it)."""
    msgs: list[dict[str, str]] = []
    ttfts = []
    for i, user in enumerate(USER_TURNS):
        msgs.append({"role": "user", "content": f"({round_no}) {user}" if i == 0 else user})
        r = stream(url, msgs, turn_tokens)
        ttfts.append(r["ttft_s"])
        msgs.append({"role": "assistant", "content": r["text"]})
    return ttfts


def delivery(url: str) -> tuple[float, float]:
    """The gateway's ``splitlm_serve_token_delivery_seconds`` (sum, count) so far."""
    import re

    import httpx

    text = httpx.get(f"{url}/metrics").text
    values = []
    for k in ("sum", "count"):
        m = re.search(rf"^splitlm_serve_token_delivery_seconds_{k} (\S+)$", text, re.M)
        assert m, "no delivery histogram in the gateway's metrics"
        values.append(float(m.group(1)))
    return values[0], values[1]


def generate_row(trunk: str, threads: int, tokens: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-m", "splitlm.tui.cli", "generate", "--trunk", trunk, "--threads", str(threads),
         "--temperature", "0", "--max-new-tokens", str(tokens), "--json", LONG_PROMPT],
        capture_output=True, text=True, check=True, env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"),
    )
    res = json.loads(out.stdout)
    per = res["timings"]["per_token_s"]
    return {"tokens": len(res["token_ids"]), "per_token_s": statistics.mean(per), "text": res["text"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the daemon and of each client")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--turn-tokens", type=int, default=24, help="max_tokens of each conversation turn")
    ap.add_argument("--reply-tokens", type=int, default=64, help="max_tokens of the tokens/s reply")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    trunk = f"unix:{tmp / 'd.sock'}"
    daemon = start_daemon(args.model, trunk, tmp / "d.log", "--threads", str(args.threads))
    gateways: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    try:
        gateways["reuse"] = start_serve(trunk, args.model, tmp / "reuse.log", threads=args.threads)
        gateways["fresh"] = start_serve(trunk, args.model, tmp / "fresh.log", "--keep-bytes", "0",
                                        threads=args.threads)
        for _, url in gateways.values():  # warm up: first-call costs out of the figures
            stream(url, [{"role": "user", "content": "Hi"}], 4)
        turns: dict[str, list[list[float]]] = {"reuse": [], "fresh": []}
        served, generated, delivered = [], [], []
        for k in range(args.rounds):
            for name in ("reuse", "fresh"):
                turns[name].append(conversation(gateways[name][1], k, args.turn_tokens))
            d0 = delivery(gateways["reuse"][1])
            served.append(stream(gateways["reuse"][1], [{"role": "user", "content": LONG_PROMPT}], args.reply_tokens))
            d1 = delivery(gateways["reuse"][1])
            delivered.append((d1[0] - d0[0]) / max(1.0, d1[1] - d0[1]))
            generated.append(generate_row(trunk, args.threads, args.reply_tokens))
            print(f"round {k + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    finally:
        for proc, _ in gateways.values():
            stop_serve(proc)
        stop(daemon)

    def med(xs: list[float]) -> float:
        return statistics.median(xs)

    ttft = {name: {f"turn{t + 1}_ms": med([r[t] for r in rows]) * 1e3 for t in (0, 4)} for name, rows in turns.items()}
    serve_per = [r["decode_s"] / max(1, r["tokens"] - 1) for r in served]
    gen_per = [g["per_token_s"] for g in generated]
    out = {
        "model": args.model, "rounds": args.rounds, "threads": args.threads, "turn_tokens": args.turn_tokens,
        "reply_tokens": args.reply_tokens, "loadavg": Path("/proc/loadavg").read_text().split()[:3],
        "ttft": ttft,
        "streamed_tokens_per_s": 1 / med(serve_per), "generate_tokens_per_s": 1 / med(gen_per),
        "overhead_per_token_ms": (med(serve_per) - med(gen_per)) * 1e3,
        "delivery_per_token_ms": med(delivered) * 1e3,
        "same_text": all(s["text"] == g["text"] for s, g in zip(served, generated)),
        "raw": {"turns_s": turns, "serve_per_token_s": serve_per, "generate_per_token_s": gen_per,
                "delivery_s": delivered},
        "command": " ".join(["python", *sys.argv]),
    }
    print(f"{'TTFT (ms, median)':28}{'turn 1':>10}{'turn 5':>10}")
    for name, label in (("reuse", "kept in the trunk"), ("fresh", "no reuse (--keep-bytes 0)")):
        print(f"{label:28}{ttft[name]['turn1_ms']:10.0f}{ttft[name]['turn5_ms']:10.0f}")
    print(f"{'decode tokens/s':28}{'serve':>10}{'generate':>10}")
    print(f"{'':28}{out['streamed_tokens_per_s']:10.1f}{out['generate_tokens_per_s']:10.1f}")
    print(f"gateway overhead per token: {out['overhead_per_token_ms']:.2f} ms against generate, "
          f"{out['delivery_per_token_ms']:.3f} ms sampled-to-sent (its own histogram); same text as generate: "
          f"{out['same_text']}; load {' '.join(out['loadavg'])}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
