"""A/B of one linear product at SmolLM2's shapes: float32, bfloat16, torch's int8 and our kernels.

For each (out, in) shape and row count: float32 ``F.linear``, bfloat16 ``F.linear``, torch's
``_weight_int8pack_mm`` (int8 weights, one scale per output row), and ``QuantLinear`` in
``q8_0``, ``q4_0`` and ``q4_1``. Calls are interleaved variant by variant and each variant cycles
through enough copies of its weight (at least ``--cold-mib``) that the weight comes from memory,
as in a decode step of a whole model, not from the cache. Each median is also given as a multiple
of its bandwidth floor: the weight's bytes over the read bandwidth measured here, torch summing a
``--bandwidth-mib`` tensor at the same threads.

``--groups 64,128`` adds ``q4_1`` and ``q8_0`` at those group sizes (``q4_1/g128``: the grouped
``q4_1g``, one scale and min per 128 weights) to the products, ``--agreement`` and ``--steps``;
``--variants`` keeps only the named ones.

Usage: ``python scripts/quant_ab.py [--threads N] [--rounds R] [--rows 1,4,64] [--groups 64,128]
[--variants q4_1,q4_1/g128] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import median_ms

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]
"""SmolLM2's products: q/o projections, k/v, gate/up, down, and the tied LM head."""


def bandwidth_gbs(mib: int, rounds: int) -> float:
    """Read bandwidth in GB/s: torch summing a ``mib`` MiB float32 tensor, median of ``rounds``."""
    import torch

    big = torch.ones(mib * (1 << 20) // 4)
    big.sum()
    ms = median_ms(lambda: big.sum(), rounds)
    return big.numel() * 4 / (ms * 1e-3) / 1e9


def _fmt_group(name: str) -> tuple[str, int]:
    """``q4_1/g128`` -> (``q4_1``, 128); ``q8_0`` -> (``q8_0``, 32)."""
    fmt, _, group = name.partition("/g")
    return fmt, int(group) if group else 32


def variants(out: int, inp: int, cold_bytes: int, groups: tuple[int, ...] = (),
             keep: set[str] | None = None) -> dict[str, tuple[int, list[Callable[[Any], Any]]]]:
    """Per variant: the weight's bytes and one callable ``x -> y`` per weight copy."""
    import torch
    import torch.nn.functional as F

    from splitlm.shared.models.quant import QuantLinear

    w = torch.randn(out, inp) / inp**0.5
    found: dict[str, tuple[int, list[Callable[[Any], Any]]]] = {}

    def copies(nbytes: int) -> int:
        return max(2, -(-cold_bytes // nbytes))

    n = copies(w.numel() * 4)
    ws = [w.clone() for _ in range(n)]
    found["float32"] = (w.numel() * 4, [lambda x, w=w: F.linear(x, w) for w in ws])
    wb = [w.to(torch.bfloat16) for _ in range(copies(w.numel() * 2))]
    found["bfloat16"] = (w.numel() * 2, [lambda x, w=w: F.linear(x.to(torch.bfloat16), w) for w in wb])
    scale = w.abs().amax(1) / 127
    q8 = torch.round(w / scale[:, None]).to(torch.int8)
    qs = [(q8.clone(), scale.clone()) for _ in range(copies(q8.numel()))]
    found["torch-int8"] = (q8.numel() + out * 4,
                           [lambda x, q=q, s=s: torch._weight_int8pack_mm(x, q, s) for q, s in qs])
    names = ["q8_0", "q4_0", "q4_1"] + [f"{f}/g{g}" for g in groups for f in ("q8_0", "q4_1")]
    for name in names:
        fmt, group = _fmt_group(name)
        layer = QuantLinear.from_float(w, None, fmt, group)
        layers = [QuantLinear(inp, out, layer.fmt, layer.packed.clone(), None, group)
                  for _ in range(copies(layer.nbytes))]
        found[name] = (layer.nbytes, list(layers))
    return {k: v for k, v in found.items() if keep is None or k in keep}


def quantize_linears(model: Any, fmt: str, group: int = 32) -> int:
    """Replace every ``nn.Linear`` under ``model`` (decoder layers and the head) by a
    ``QuantLinear`` in ``fmt`` at ``group`` weights per scale; returns how many."""
    from torch import nn

    from splitlm.shared.models.quant import QuantLinear

    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, m in found:
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        setattr(parent, name.rpartition(".")[2], QuantLinear.from_float(m.weight, m.bias, fmt, group))
    return len(found)


def _int8_activations(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """A forward pre-hook: the input rounded to Q8_0 blocks (int8 and a scale per 32 values),
    as llama.cpp quantizes activations for its integer dot products."""
    from splitlm.shared.models.quant import dequantize, quantize

    (x,) = args
    rows = x.reshape(-1, x.shape[-1]).float()
    back = dequantize(quantize(rows, "q8_0"), "q8_0", rows.shape[1])
    return (back.reshape(x.shape).to(x.dtype),)


def agreement(tokens: int, threads: int, groups: tuple[int, ...] = (),
              keep: set[str] | None = None) -> dict[str, Any]:
    """Greedy decodes of SmolLM2 with the decoder layers' linears quantized (and the head, where
    the name says), against float32: the tokens that agree before the first difference, per
    prompt, and the median decode step.

    SmolLM2's file is Q4_1 (layers) and Q8_0 (embedding/head), so its float32 weights come back
    exactly under q4_1 and q8_0 blocks: the weight error of a format is measured on the
    embedding matrix as well, which is the nearest to unquantized weights the file holds.
    """
    import copy

    import torch
    from _common import load_full, prompt_ids, timed_decode

    from splitlm.shared.models.precision import decoder_layers
    from splitlm.shared.models.quant import QuantLinear

    model, full = load_full("smollm2", threads)
    emb = full.model.get_input_embeddings().weight.detach()
    weight_err = {}
    for name in ("q8_0", "q4_0", "q4_1", *(f"{f}/g{g}" for g in groups for f in ("q8_0", "q4_1"))):
        fmt, group = _fmt_group(name)
        back = QuantLinear.from_float(emb, None, fmt, group).dequantize()
        weight_err[name] = float((back - emb).pow(2).mean() / emb.pow(2).mean())
    prompts = [prompt_ids(24), [int(t) for t in model.tokenizer("The capital of France is")["input_ids"]],
               [int(t) for t in model.tokenizer("def fibonacci(n):")["input_ids"]]]
    out: dict[str, Any] = {"weight_rel_mse_on_embedding": weight_err, "tokens": tokens}
    with torch.inference_mode():
        ref = [timed_decode(full, p, tokens) for p in prompts]
        out["float32_step_ms"] = [round(r.per_token_ms, 2) for r in ref]
        names = ["q8_0", "q4_0", "q4_1", "q4_1+head-q8_0", "q4_1+head-q4_1",
                 "q4_1+head-q8_0+int8-activations"]
        names += [f"{f}/g{g}" for g in groups for f in ("q8_0", "q4_1")]
        names += [f"q4_1/g{g}+head-q4_1/g{g}" for g in groups]  # what --weights int4 --group-size g runs
        for name in names:
            if keep is not None and name not in keep:
                continue
            fmt, _, head = name.partition("+head-")
            head, _, act = head.partition("+")
            part = copy.deepcopy(full)
            for layer in decoder_layers(part.model):
                quantize_linears(layer, *_fmt_group(fmt))
            if head:
                part.model.lm_head = QuantLinear.from_float(part.model.lm_head.weight, None, *_fmt_group(head))
            if act:  # what integer (VNNI) dot products would compute, up to summation order
                for m in part.model.modules():
                    if isinstance(m, QuantLinear):
                        m.register_forward_pre_hook(_int8_activations)
            got = [timed_decode(part, p, tokens) for p in prompts]
            same = []
            for a, b in zip(ref, got):
                n = next((i for i, (x, y) in enumerate(zip(a.tokens, b.tokens)) if x != y), len(a.tokens))
                same.append(n)
            out[name] = {"agreeing_prefix": same, "of": tokens + 1,
                        "step_ms": [round(g.per_token_ms, 2) for g in got]}
            del part
    return out


def model_steps(steps: int, threads: int, groups: tuple[int, ...] = (),
                keep: set[str] | None = None) -> dict[str, Any]:
    """One-token decode steps of the whole SmolLM2 (30 layers and the head) per variant,
    interleaved step by step so the machine's load falls on all alike; medians in ms, and each
    variant's weight bytes read per step (the layers' linears and the head)."""
    import copy

    import torch
    from _common import load_full

    from splitlm.shared.models.precision import decoder_layers
    from splitlm.shared.models.quant import QuantLinear

    _, full = load_full("smollm2", threads)
    parts: dict[str, Any] = {"float32": full}
    bf16 = copy.deepcopy(full)
    bf16.model.to(torch.bfloat16)
    parts["bfloat16"] = bf16
    names = ["q8_0", "q4_1+head-q8_0", "q4_0+head-q8_0"]
    names += [f"q4_1/g{g}+head-q4_1/g{g}" for g in (32, *groups)]
    for name in names:
        if keep is not None and name not in keep:
            continue
        fmt, _, head = name.partition("+head-")
        part = copy.deepcopy(full)
        for layer in decoder_layers(part.model):
            quantize_linears(layer, *_fmt_group(fmt))
        part.model.lm_head = QuantLinear.from_float(part.model.lm_head.weight, None, *_fmt_group(head or fmt))
        parts[name] = part

    def linear_bytes(part: Any) -> int:
        total = 0
        for m in part.model.modules():
            if isinstance(m, QuantLinear):
                total += m.nbytes
            elif isinstance(m, torch.nn.Linear):
                total += m.weight.numel() * m.weight.element_size()
        return total

    x = torch.tensor([[1234]])
    times: dict[str, list[float]] = {k: [] for k in parts}
    with torch.inference_mode():
        for i in range(steps + 2):
            for name, part in parts.items():
                cache = part.new_cache()
                t0 = time.perf_counter()
                part.forward(x, 0, cache)
                if i >= 2:
                    times[name].append((time.perf_counter() - t0) * 1e3)
    f32 = statistics.median(times["float32"])
    return {name: {"step_ms": round(statistics.median(t), 2),
                   "ratio_to_float32": round(statistics.median(t) / f32, 3),
                   "linear_mib": round(linear_bytes(parts[name]) / (1 << 20), 1)}
            for name, t in times.items()} | {"steps": steps, "threads": threads}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=30, help="timed calls per variant and case")
    ap.add_argument("--rows", default="1,4,64", help="row counts, comma-separated")
    ap.add_argument("--cold-mib", type=int, default=96, help="weight bytes each variant cycles through")
    ap.add_argument("--bandwidth-mib", type=int, default=1024)
    ap.add_argument("--json", type=Path, help="write the figures here too")
    ap.add_argument("--agreement", type=int, metavar="TOKENS", default=0,
                    help="instead: greedy SmolLM2 decodes with quantized linears vs float32")
    ap.add_argument("--steps", type=int, default=0,
                    help="instead: whole-SmolLM2 one-token steps per variant, interleaved")
    ap.add_argument("--groups", default="", help="group sizes besides 32, comma-separated (64,128)")
    ap.add_argument("--variants", default="", help="only these variants, comma-separated")
    a = ap.parse_args()
    groups = tuple(int(g) for g in a.groups.split(",") if g)
    keep = set(a.variants.split(",")) if a.variants else None
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    if a.agreement or a.steps:
        found = (agreement(a.agreement, a.threads, groups, keep) if a.agreement
                 else model_steps(a.steps, a.threads, groups, keep))
        print(json.dumps(found, indent=1))
        if a.json:
            a.json.write_text(json.dumps(found, indent=1) + "\n")
        return

    from splitlm.shared.models.quant import QuantLinear, kernel

    torch.set_num_threads(a.threads)
    rows_list = [int(r) for r in a.rows.split(",")]
    lib = kernel()
    gbs = bandwidth_gbs(a.bandwidth_mib, 9)
    results: list[dict[str, Any]] = []
    with torch.inference_mode():
        tiny = QuantLinear.from_float(torch.randn(32, 32), None, "q4_1")
        tiny_w = torch.randn(32, 32)
        xt = torch.randn(1, 32)
        overhead = {"quant_linear_32x32_us": median_ms(lambda: tiny(xt), 2000) * 1e3,
                    "f_linear_32x32_us": median_ms(lambda: torch.nn.functional.linear(xt, tiny_w), 2000) * 1e3}
        for out, inp in SHAPES:
            found = variants(out, inp, a.cold_mib << 20, groups, keep)
            for rows in rows_list:
                x = torch.randn(rows, inp)
                times: dict[str, list[float]] = {k: [] for k in found}
                turn = dict.fromkeys(found, 0)
                for i in range(a.rounds + 2):
                    for name, (_, calls) in found.items():
                        fn = calls[turn[name] % len(calls)]
                        turn[name] += 1
                        t0 = time.perf_counter()
                        fn(x)
                        if i >= 2:  # two warm-up calls
                            times[name].append((time.perf_counter() - t0) * 1e3)
                for name, (nbytes, _) in found.items():
                    ms = statistics.median(times[name])
                    floor_ms = nbytes / (gbs * 1e9) * 1e3
                    results.append({"shape": f"{out}x{inp}", "rows": rows, "variant": name,
                                    "ms": round(ms, 4), "weight_mib": round(nbytes / (1 << 20), 3),
                                    "x_floor": round(ms / floor_ms, 2)})
            del found
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    print(f"threads {a.threads}, kernel {lib.isa}, read bandwidth {gbs:.1f} GB/s, load {' '.join(load)}")
    print(f"per call, 32x32 one row: QuantLinear {overhead['quant_linear_32x32_us']:.1f} us, "
          f"F.linear {overhead['f_linear_32x32_us']:.1f} us")
    names = list(dict.fromkeys(r["variant"] for r in results))
    print(f"{'shape':>10} {'rows':>4}  " + "  ".join(f"{n:>16}" for n in names))
    for shape in dict.fromkeys(r["shape"] for r in results):
        for rows in rows_list:
            cells = {r["variant"]: r for r in results if r["shape"] == shape and r["rows"] == rows}
            print(f"{shape:>10} {rows:>4}  " + "  ".join(
                f"{cells[n]['ms']:>8.3f} ({cells[n]['x_floor']:>4.1f}x)" for n in names))
    print("ms median per product (multiple of the bandwidth floor in brackets)")
    if a.json:
        a.json.write_text(json.dumps({"threads": a.threads, "isa": lib.isa, "bandwidth_gbs": round(gbs, 2),
                                      "loadavg": load, "overhead": overhead, "rounds": a.rounds,
                                      "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
