"""A float32 decode step against its memory-bandwidth floor (issue 13). A measurement tool, not a test.

A one-token decode step reads every weight once (plus the keys and values it attends to), so its
floor is those bytes divided by the memory bandwidth. Measured here, per thread count:

- bandwidth: torch summing a 1 GiB tensor, and a stream of 576x1536 one-row products over 1 GiB
  of weights (what a decode step does; the higher of the two is the floor's bandwidth);
- bare: the model's own linear weights, each through one ``F.linear`` of one row, in the model's
  order, nothing else (the kernels' own floor: what the products alone cost); and the same
  products through oneDNN instead of MKL (for comparison: its last bits differ from MKL's, and
  transformers' own decode uses MKL's, so it is no option for one-row products);
- full: the full model's one-token step (``Part.forward``) at each context, with the lean layer
  step (``llama.lean_layer``), the same with q/k/v and gate/up as separate products (unfused),
  and with transformers' layer modules, interleaved step by step;
- client: the split's client part for one token (bottom layers, then top layers + norm + head),
  lean and module layers likewise.

Each figure is a median over ``--rounds`` steps (every variant takes one step in turn, so the
load of other work falls on all alike), also as a multiple of its floor; "CPU ms" is the
process's CPU time for the step (all threads), which waiting for a core on a busy machine does
not inflate. Usage:

    .venv/bin/python scripts/decode_floor.py --threads 2,1 --contexts 16,1024 --rounds 40 [--json]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

from _common import median_ms

GIB = 2**30


def bandwidth(reps: int) -> dict[str, float]:
    """GB/s of a 1 GiB read (``sum``) and of a stream of 576x1536 one-row products over 1 GiB."""
    import torch
    from torch.nn import functional as F  # noqa: N812 - torch's own spelling

    big = torch.ones(GIB // 4, dtype=torch.float32)
    big.sum()
    read = GIB / median_ms(big.sum, reps) / 1e6
    del big
    ws = [torch.randn(1536, 576) for _ in range(GIB // (1536 * 576 * 4))]
    x = torch.randn(1, 576)

    def stream() -> None:
        for w in ws:
            F.linear(x, w)

    stream()
    products = len(ws) * ws[0].numel() * 4 / median_ms(stream, reps) / 1e6
    return {"read_gbs": read, "matvec_gbs": products}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", default="2,1", help="torch thread counts, measured in turn")
    ap.add_argument("--contexts", default="16,1024", help="cached positions before the timed step")
    ap.add_argument("--rounds", type=int, default=40, help="timed steps per variant")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # what the daemon and the client run with
    import torch
    from torch.nn import functional as F  # noqa: N812 - torch's own spelling

    from splitlm.shared import prepare
    from splitlm.shared.models import PartSpec, build_parts
    from splitlm.shared.models.decoder import RotaryDecoderFamily
    from splitlm.shared.plan import default_split

    model = prepare.load_model(args.model)
    L = model.num_layers
    family = model.family
    split = default_split(L, str(model.source.config.model_type))
    cpu = torch.device("cpu")
    full, bottom, top = build_parts(
        model.source, family, [PartSpec.full(L), PartSpec.bottom(split[0]), PartSpec.top(split[1], L)],
        torch.float32, cpu,
    )

    class ModuleLayers(type(family)):  # type: ignore[misc]  # the family, every layer as transformers' module
        def run_layer(self, *a: Any, **k: Any) -> Any:
            return RotaryDecoderFamily.run_layer(self, *a, **k)

    class Unfused(type(family)):  # type: ignore[misc]  # the lean step with q/k/v and gate/up as separate products
        def run_layer(self, layer: Any, h: Any, step: Any, cache: Any) -> Any:
            return super().run_layer(layer, h, dataclasses.replace(step, fusable=False), cache)

    def as_modules(part: Any, kind: type = ModuleLayers) -> Any:
        other = copy.copy(part)
        other.family = kind()
        return other

    def owned_linears(*parts: Any) -> list[Any]:
        """The linear modules whose weights the parts hold (a part's skeleton keeps the rest on
        the meta device), each once (a client's bottom and top share the tied embedding)."""
        seen = {id(m): m for p in parts for m in p.model.modules()
                if isinstance(m, torch.nn.Linear) and m.weight.device.type != "meta"}
        return list(seen.values())

    linears = owned_linears(full)
    weight_bytes = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    inputs = {id(m): torch.randn(1, 1, m.in_features) for m in linears}

    def bare() -> None:
        for m in linears:
            F.linear(inputs[id(m)], m.weight)

    flat = {k: v.reshape(1, -1) for k, v in inputs.items()}

    def bare_onednn() -> None:  # the same products through oneDNN (not MKL's bits: not an option for decode)
        for m in linears:
            torch.ops.mkldnn._linear_pointwise(flat[id(m)], m.weight, None, "none", [], "")

    cfg = full.config
    kv_heads = int(getattr(cfg, "num_key_value_heads", cfg.num_attention_heads))
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    kv_bytes_per_position = 2 * kv_heads * head_dim * 4  # keys + values, one layer, float32
    client_bytes = sum(m.weight.numel() * m.weight.element_size() for m in owned_linears(bottom, top))
    client_layers = split[0] + (L - split[1])
    contexts = [int(c) for c in args.contexts.split(",")]
    vocab = min(int(cfg.vocab_size), 20000)
    x1 = torch.tensor([[200]])
    h1 = torch.randn(1, 1, full.hidden_size)
    report: dict[str, Any] = {"model": args.model, "weight_bytes": weight_bytes, "rounds": args.rounds,
                              "loadavg_start": open("/proc/loadavg").read().split()[:3], "threads": {}}
    with torch.inference_mode():
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            bw = bandwidth(max(5, args.rounds // 8))
            gbs = max(bw.values())
            # variant name -> (step, bytes it reads)
            variants: dict[str, tuple[Callable[[], object], int]] = {"bare F.linear loop": (bare, weight_bytes)}
            if torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]
                variants["bare oneDNN loop"] = (bare_onednn, weight_bytes)
            for ctx in contexts:
                ids = torch.tensor([[(37 * i + 11) % vocab + 100 for i in range(ctx)]])
                for name, part in (("lean", full), ("lean unfused", as_modules(full, Unfused)),
                                   ("modules", as_modules(full))):
                    cache = part.new_cache()
                    part.forward(ids, 0, cache)

                    def step(part: Any = part, cache: Any = cache, ctx: int = ctx) -> object:
                        return part.forward(x1, ctx, cache)  # rolls back to ctx, then one position

                    variants[f"full @{ctx} {name}"] = (step, weight_bytes + L * ctx * kv_bytes_per_position)
            for name, (b, t) in (("lean", (bottom, top)), ("modules", (as_modules(bottom), as_modules(top)))):
                ids = torch.tensor([[(37 * i + 11) % vocab + 100 for i in range(contexts[0])]])
                bc, tc = b.new_cache(), t.new_cache()
                b.forward(ids, 0, bc)
                t.forward(h1.expand(1, contexts[0], -1).contiguous(), 0, tc)

                def client(b: Any = b, t: Any = t, bc: Any = bc, tc: Any = tc) -> object:
                    b.forward(x1, contexts[0], bc)
                    return t.forward(h1, contexts[0], tc)

                kv = client_layers * contexts[0] * kv_bytes_per_position
                variants[f"client @{contexts[0]} {name}"] = (client, client_bytes + kv)
            times: dict[str, list[float]] = {k: [] for k in variants}
            cpu: dict[str, list[float]] = {k: [] for k in variants}
            for fn, _ in variants.values():
                fn()
                fn()
            for _ in range(args.rounds):
                for k, (fn, _) in variants.items():
                    c0, t0 = time.process_time(), time.perf_counter()
                    fn()
                    times[k].append((time.perf_counter() - t0) * 1e3)
                    cpu[k].append((time.process_time() - c0) * 1e3)
            rows = {}
            for k, (_, nbytes) in variants.items():
                ms = statistics.median(times[k])
                floor = nbytes / gbs / 1e6
                rows[k] = {"ms": round(ms, 2), "cpu_ms": round(statistics.median(cpu[k]), 2),
                           "floor_ms": round(floor, 2), "x_floor": round(ms / floor, 2),
                           "mb_read": round(nbytes / 1e6, 1)}
            report["threads"][str(threads)] = {"bandwidth_gbs": {k: round(v, 2) for k, v in bw.items()}, "rows": rows}
    report["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{args.model}: linear weights {weight_bytes / 1e6:.1f} MB; {args.rounds} interleaved steps per variant; "
          f"load average {' '.join(report['loadavg_start'])} -> {' '.join(report['loadavg_end'])}")
    for threads, r in report["threads"].items():
        bw = r["bandwidth_gbs"]
        print(f"\n{threads} thread(s): bandwidth {bw['read_gbs']:.1f} GB/s (1 GiB read), "
              f"{bw['matvec_gbs']:.1f} GB/s (576x1536 one-row products)")
        print(f"  {'variant':28} {'MB read':>8} {'floor ms':>9} {'ms':>8} {'x floor':>8} {'CPU ms':>8}")
        for k, row in r["rows"].items():
            print(f"  {k:28} {row['mb_read']:8.1f} {row['floor_ms']:9.2f} {row['ms']:8.2f} {row['x_floor']:8.2f}"
                  f" {row['cpu_ms']:8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
