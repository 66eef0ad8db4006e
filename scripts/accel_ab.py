"""The acceleration list, each setting on/off, measured interleaved on the full model (decode).

For each setting: median per-token latency with it off and on over alternating rounds, and
whether the greedy tokens are the same. A measurement tool, not a test.

    .venv/bin/python scripts/accel_ab.py --threads 1 --rounds 3
"""

from __future__ import annotations

import contextlib
import json
import statistics
from collections.abc import Callable, Iterator

from _common import ab_setup, prompt_ids, timed_decode


def main() -> int:
    args, model, full = ab_setup(__doc__, tokens=16, prompt=64)
    import torch

    from splitlm.shared.models.base import Part

    plain_forward = Part.forward.__wrapped__  # type: ignore[attr-defined]  # without inference_mode
    ids = prompt_ids(args.prompt)

    def decode(step: Callable[..., torch.Tensor]) -> tuple[float, float, list[int]]:
        d = timed_decode(full, ids, args.tokens, step)
        return d.per_token_ms, d.ttft_ms, d.tokens

    @contextlib.contextmanager
    def nothing() -> Iterator[None]:
        yield

    @contextlib.contextmanager
    def no_grad_instead() -> Iterator[None]:
        with torch.no_grad():
            yield

    @contextlib.contextmanager
    def precision(p: str) -> Iterator[None]:
        before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(p)
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(before)

    @contextlib.contextmanager
    def attention(impl: str) -> Iterator[None]:
        before = full.model.config._attn_implementation
        full.model.config._attn_implementation = impl
        try:
            yield
        finally:
            full.model.config._attn_implementation = before

    def grad_mode(x: torch.Tensor, pos: int, c: object) -> torch.Tensor:
        return plain_forward(full, x, pos, c)  # type: ignore[no-any-return]

    def normal(x: torch.Tensor, pos: int, c: object) -> torch.Tensor:
        return full.forward(x, pos, c)  # type: ignore[arg-type]

    # (name, off, on): each a (context, step) pair; "on" is the setting under test
    settings = [
        ("torch.inference_mode (vs no_grad)", (no_grad_instead, grad_mode), (nothing, normal)),
        ("set_float32_matmul_precision('high')", (lambda: precision("highest"), normal),
         (lambda: precision("high"), normal)),
        ("set_float32_matmul_precision('medium')", (lambda: precision("highest"), normal),
         (lambda: precision("medium"), normal)),
        ("attn_implementation sdpa (vs eager)", (lambda: attention("eager"), normal),
         (lambda: attention("sdpa"), normal)),
    ]
    results = {}
    decode(normal)  # warm-up
    for name, off, on in settings:
        rec: dict[str, list[float]] = {"off": [], "on": [], "off_ttft": [], "on_ttft": []}
        toks: dict[str, list[int]] = {}
        for _ in range(args.rounds):
            for which, (ctx, step) in (("off", off), ("on", on)):
                with ctx():
                    ms, ttft, out = decode(step)
                rec[which].append(ms)
                rec[f"{which}_ttft"].append(ttft)
                toks[which] = out
        results[name] = {
            "off_ms": statistics.median(rec["off"]), "on_ms": statistics.median(rec["on"]),
            "off_ttft_ms": statistics.median(rec["off_ttft"]), "on_ttft_ms": statistics.median(rec["on_ttft"]),
            "same_tokens": toks["off"] == toks["on"],
        }
    tok = model.tokenizer
    results["fast tokenizer"] = {"is_fast": bool(getattr(tok, "is_fast", False)), "class": type(tok).__name__}
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
