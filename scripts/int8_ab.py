"""A/B of the int8 back-ends for ``--weights int8`` on SmolLM2 decode (full model, CPU).

float32 and bfloat16 vs torch's dynamic quantisation vs torchao's int8 weight-only (what
``--weights int8`` uses) and dynamic-int8 configs (no ``torch.compile``): one-token steps of the
full model, interleaved step by step, medians. Usage:
``python scripts/int8_ab.py [--rounds STEPS] [--threads N]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
import warnings

import torch

from splitlm.shared import prepare
from splitlm.shared.generation import LocalPipeline
from splitlm.shared.models import PartSpec, build_part
from splitlm.shared.models.precision import conv1d_to_linear as _conv1d_to_linear
from splitlm.shared.models.precision import decoder_layers

log = logging.getLogger(__name__)


def _torch_dynamic(model: torch.nn.Module) -> None:
    """torch's own dynamic quantisation (int8 x int8, activations quantised per call)."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    for layer in decoder_layers(model):
        _conv1d_to_linear(layer)
        names = [n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
        quantize_dynamic(layer, dict.fromkeys(names, per_channel_dynamic_qconfig), dtype=torch.qint8, inplace=True)


def _torchao(model: torch.nn.Module, kind: str) -> None:
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        quantize_,
    )

    cfg = Int8WeightOnlyConfig() if kind == "weight-only" else Int8DynamicActivationInt8WeightConfig()
    for layer in decoder_layers(model):
        quantize_(layer, cfg)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=60, help="steps per variant")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    warnings.simplefilter("ignore")
    model = prepare.load_model("smollm2")
    L = model.num_layers
    cpu = torch.device("cpu")
    variants = {}
    for name in ("float32", "bfloat16", "torch-dynamic", "torchao-weight-only", "torchao-dynamic"):
        dtype = torch.bfloat16 if name == "bfloat16" else torch.float32
        part = build_part(model.source, model.family, PartSpec.full(L), dtype, cpu)
        if name == "torch-dynamic":
            _torch_dynamic(part.model)
        elif name.startswith("torchao"):
            _torchao(part.model, name.removeprefix("torchao-"))
        variants[name] = LocalPipeline(part)
    # fine-grained interleaving (one decode-sized step per variant, in turn) so that the load of
    # other jobs on the machine falls on every variant alike; medians over steps
    x = torch.tensor([[model.tokenizer("Hello", add_special_tokens=False)["input_ids"][0]]])
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.inference_mode():
        for _ in range(3):
            for pipe in variants.values():
                pipe.part.forward(x, 0, pipe.part.new_cache())
        for _ in range(a.rounds):
            for name, pipe in variants.items():
                cache = pipe.part.new_cache()
                t0 = time.perf_counter()
                pipe.part.forward(x, 0, cache)
                times[name].append((time.perf_counter() - t0) * 1e3)
    out = {k: round(statistics.median(v), 2) for k, v in times.items()}
    ratio = {k: round(statistics.median(a / b for a, b in zip(v, times["float32"])), 3) for k, v in times.items()}
    print(json.dumps({"step_ms_median": out, "ratio_to_float32_median": ratio, "steps": a.rounds,
                      "threads": a.threads}))


if __name__ == "__main__":
    main()
