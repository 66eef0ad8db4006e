"""torch.compile on the full model's decoder layers (decode steps), on/off interleaved: compile
time, per-token latency, and whether the greedy tokens and logits stay bit-identical.

Only the layers' MLPs are compiled (shape-stable in decode, no cache inside); attention with
splitlm's growing cache would recompile per length without a static cache, and a static cache
changes the attention's reduction length (masked padding), so it cannot stay bit-exact with
transformers' dynamic cache. A measurement tool, not a test.

    .venv/bin/python scripts/compile_ab.py --threads 1 --rounds 3
"""

from __future__ import annotations

import json
import statistics
import time

from _common import ab_setup, prompt_ids, timed_decode


def main() -> int:
    args, _, full = ab_setup(__doc__, tokens=12, prompt=16)
    import torch

    layers = full.model.model.layers
    eager = [layer.mlp.forward for layer in layers]
    ids = prompt_ids(args.prompt)

    def decode() -> tuple[float, list[int], torch.Tensor]:
        d = timed_decode(full, ids, args.tokens)
        return d.per_token_ms, d.tokens, d.logits

    def use(compiled: bool) -> None:
        for layer, fwd, comp in zip(layers, eager, compiled_fwds):
            layer.mlp.forward = comp if compiled else fwd

    compiled_fwds = [torch.compile(layer.mlp.forward, dynamic=None) for layer in layers]
    decode()  # eager warm-up
    use(True)
    t0 = time.perf_counter()
    decode()  # compiles (prefill shape, then the decode shape)
    compile_s = time.perf_counter() - t0
    rec: dict[str, list[float]] = {"eager": [], "compiled": []}
    outs: dict[str, tuple[list[int], torch.Tensor]] = {}
    for _ in range(args.rounds):
        for name in rec:
            use(name == "compiled")
            ms, toks, logits = decode()
            rec[name].append(ms)
            outs[name] = (toks, logits)
    print(json.dumps({
        "compile_s": round(compile_s, 1),
        "eager_ms": round(statistics.median(rec["eager"]), 2),
        "compiled_ms": round(statistics.median(rec["compiled"]), 2),
        "same_tokens": outs["eager"][0] == outs["compiled"][0],
        "bit_identical_logits": bool(torch.equal(outs["eager"][1], outs["compiled"][1])),
        "max_abs_logit_diff": float((outs["eager"][1] - outs["compiled"][1]).abs().max()),
        "threads": args.threads,
    }, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
