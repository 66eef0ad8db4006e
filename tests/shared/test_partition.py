"""The cost model and the partition strategies (``shared.partition``): numbers against real
tiny models (parameter counts, packed bytes, KV cache bytes), each strategy's cuts, custom cuts,
plans that do not fit, and ``splitlm plan``'s output."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from splitlm.shared.errors import UsageError
from splitlm.shared.models import PartSpec, build_part, family_for, resolve
from splitlm.shared.models.precision import Precision, decoder_layers
from splitlm.shared.partition import (
    Device,
    NothingFits,
    balanced_cuts,
    layer_weights,
    model_cost,
    parse_layers,
    plan,
    probe_devices,
)
from tests.conftest import FAMILY_KINDS, save_tiny, tiny_config

ROOT = Path(__file__).resolve().parents[2]


def _storage_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each storage once."""
    seen: dict[int, int] = {}
    for t in itertools.chain(module.parameters(), module.buffers()):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_parameter_counts_equal_the_built_model(kind: str) -> None:
    from transformers import AutoModelForCausalLM

    config = tiny_config(kind)
    model = AutoModelForCausalLM.from_config(config)
    cost = model_cost(config, kind)
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        assert cost.layers[i].params == sum(p.numel() for p in layer.parameters()), i
    ends = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in layers.parameters())
    assert cost.embed.params + cost.head.params == ends
    assert cost.layers[0].weight_bytes == cost.layers[0].params * 4  # float32


@pytest.mark.parametrize(("kind", "weights", "group"), [
    ("llama", "int8", 32), ("llama", "int4", 32), ("gpt2", "int4", 64), ("gemma2", "int8", 128),
    ("qwen2", "bfloat16", 32),
])
def test_bytes_at_a_precision_equal_the_built_part(
    tiny_models: dict[str, Path], kind: str, weights: str, group: int
) -> None:
    """A trunk layer built at the precision holds the bytes the cost model says (packed blocks
    and their scales, norms and biases in float32)."""
    src = resolve(str(tiny_models[kind]))
    dtype = torch.bfloat16 if weights == "bfloat16" else torch.float32
    part = build_part(src, family_for(src.config), PartSpec.trunk(2, 3), dtype, torch.device("cpu"),
                      Precision(weights, dtype, group))
    cost = model_cost(src.config, kind, weights, group)
    assert cost.layers[2].weight_bytes == _storage_bytes(decoder_layers(part.model)[2])


@pytest.mark.parametrize("kind", ["llama", "gemma3"])  # GQA; sliding layers beside a global one
def test_kv_bytes_per_position_equal_a_real_cache(tiny_models: dict[str, Path], kind: str) -> None:
    src = resolve(str(tiny_models[kind]))
    part = build_part(src, family_for(src.config), PartSpec.trunk(1, 5), torch.float32, torch.device("cpu"))
    cache = part.new_cache()
    part.forward(torch.randn(1, 5, 64), 0, cache)  # 5 positions: inside the sliding window of 6
    cost = model_cost(src.config, kind, max_context=4096)
    assert cache.nbytes() == 5 * sum(cost.layers[i].kv_bytes_per_position for i in range(1, 5))
    windows = [cost.layers[i].sliding_window for i in range(6)]
    if kind == "gemma3":  # a sliding layer holds its window and the rollback depth, not the context
        assert windows == [6, 6, 6, 6, 6, None]
        assert cost.layers[0].kv_positions == 6 - 1 + 256 and cost.layers[5].kv_positions == 4096


def _best(costs: list[float], k: int) -> float:
    """The smallest largest-stage cost over every cut (brute force)."""
    best = float("inf")
    for cuts in itertools.combinations(range(1, len(costs)), k - 1):
        bounds = (0, *cuts, len(costs))
        best = min(best, max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])))
    return best


def _gemma3_cost(layers: int = 14, context: int = 4096):  # type: ignore[no-untyped-def]
    config = tiny_config("gemma3")
    config.num_hidden_layers = layers
    config.layer_types = ["full_attention" if i % 5 == 4 else "sliding_attention" for i in range(layers)]
    return model_cost(config, "gemma3", max_context=context)


@pytest.mark.parametrize("strategy", ["memory", "compute", "mixed"])
def test_balanced_strategies_find_the_best_cut(strategy: str) -> None:
    """Global layers hold the whole context's KV and attend to all of it, sliding ones their
    window: each strategy's plan is the cut with the smallest largest stage, by brute force."""
    cost = _gemma3_cost()
    p = plan(cost, strategy, stages=3)
    a, b = p.split
    assert (a, b) == (2, 12) and [s.role for s in p.stages] == ["bottom", "trunk", "trunk", "trunk", "top"]
    w = layer_weights(cost, strategy, a, b)
    sizes = [s.end - s.start for s in p.trunk]
    bounds = list(itertools.accumulate([0, *sizes]))
    got = max(sum(w[x:y]) for x, y in zip(bounds, bounds[1:]))
    assert got == pytest.approx(_best(w, 3))
    uniform = plan(cost, "uniform", stages=3)
    assert [s.end - s.start for s in uniform.trunk] == [4, 3, 3]
    if strategy == "memory":  # the memory plan is not the uniform one here, and is better at its own cost
        assert sizes != [4, 3, 3]
        assert max(s.memory_bytes for s in p.trunk) < max(s.memory_bytes for s in uniform.trunk)


def test_stages_tile_the_model_and_the_ends_are_the_clients() -> None:
    cost = _gemma3_cost()
    for strategy in ("uniform", "memory", "compute", "mixed"):
        d = plan(cost, strategy, stages=4).to_dict()
        spans = [tuple(s["layers"]) for s in d["stages"]]
        assert spans[0][0] == 0 and spans[-1][1] == 14 and all(x[1] == y[0] for x, y in zip(spans, spans[1:]))
        assert d["stages"][0]["role"] == "bottom" and d["stages"][-1]["role"] == "top"
        assert all(isinstance(s["weight_bytes"], int) and s["flops_per_token"] > 0 for s in d["stages"])
    # the ends: the embedding at the bottom, the (tied) head's FLOPs at the top
    p = plan(cost, "uniform", stages=1)
    assert p.stages[0].params == cost.embed.params + 2 * cost.layers[0].params
    assert p.stages[-1].flops_per_token == cost.head.flops_per_token + sum(x.flops_per_token for x in cost.layers[12:])


def test_devices_of_different_sizes_get_layers_by_size() -> None:
    cost = _gemma3_cost(layers=12, context=64)
    total = sum(x.memory_bytes for x in cost.layers[2:10])
    big, small = Device("cuda:0", 3 * total), Device("cuda:1", total)
    p = plan(cost, "memory", devices=[big, small])
    assert [s.device for s in p.trunk] == ["cuda:0", "cuda:1"]
    assert p.trunk[0].end - p.trunk[0].start == 6  # 3:1 by memory: 6 of the 8 layers on the larger


def test_custom_cuts() -> None:
    cost = _gemma3_cost()
    p = plan(cost, "custom", layers="1:5,5:13")
    assert [(s.start, s.end, s.role) for s in p.stages] == [(0, 1, "bottom"), (1, 5, "trunk"), (5, 13, "trunk"),
                                                            (13, 14, "top")]
    for bad, words in [("2:5,6:9", "gap"), ("2:6,5:9", "overlap"), ("0:5", "inside 1..13"), ("2:14", "inside"),
                       ("2-5", "A:B"), ("5:5", "empty")]:
        with pytest.raises(UsageError, match=words):
            parse_layers(bad, 14)
    with pytest.raises(UsageError, match="needs --layers"):
        plan(cost, "custom")
    with pytest.raises(UsageError, match="goes with --strategy custom"):
        plan(cost, "memory", layers="2:5")


def test_nothing_fits_says_how_much_is_missing() -> None:
    cost = _gemma3_cost()
    need = sum(x.memory_bytes for x in cost.layers[2:12])
    with pytest.raises(NothingFits, match="missing"):
        plan(cost, "memory", devices=[Device("cpu", need // 4), Device("cpu", need // 4)])
    with pytest.raises(NothingFits, match="client-memory"):
        plan(cost, "memory", client_memory=1000)
    # a client bound that holds fewer than the default layers keeps what fits, one each end at least
    bottom_top = plan(cost, "uniform").stages
    roomy = bottom_top[0].memory_bytes + bottom_top[-1].memory_bytes
    p = plan(cost, "uniform", client_memory=roomy - 1)
    assert p.split != (2, 12) and p.split[0] >= 1 and p.split[1] <= 13


def test_more_stages_than_layers_is_refused() -> None:
    with pytest.raises(UsageError, match="at least 11 trunk layers"):
        plan(_gemma3_cost(), "memory", stages=11)
    assert balanced_cuts([1.0, 1.0, 5.0, 1.0], [1.0, 1.0]) == [2, 2]


@pytest.mark.skipif(torch.cuda.device_count() > 7, reason="this host has a cuda:7")
def test_a_device_that_does_not_exist_is_refused() -> None:
    with pytest.raises(UsageError, match="cuda:7 does not exist"):
        probe_devices(["cuda:7"])
    with pytest.raises(UsageError, match="one CPU device"):
        probe_devices(["cpu:9"])
    two = probe_devices(["cpu", "cpu"])
    assert two[0].capacity == two[1].capacity and two[0].capacity  # the host's memory, shared


def _plan_here(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``splitlm plan ARGS`` through the CLI's entry point, in this process."""
    from splitlm.tui.cli import main

    rc = main(["plan", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_plan_json_of_smollm2_from_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _plan_here(capsys, "--model", "smollm2", "--strategy", "mixed", "--stages", "3", "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert d["strategy"] == "mixed" and d["num_layers"] == 30 and d["split"] == [2, 28]
    spans = [tuple(s["layers"]) for s in d["stages"]]
    assert spans[0] == (0, 2) and spans[-1] == (28, 30) and len(spans) == 5
    assert all(x[1] == y[0] for x, y in zip(spans, spans[1:]))
    for s in d["stages"]:
        assert {"layers", "device", "role", "weight_bytes", "kv_bytes_per_position", "flops_per_token"} <= set(s)
        assert isinstance(s["weight_bytes"], int) and isinstance(s["flops_per_token"], int)
    assert d["stages"][1]["kv_bytes_per_position"] == 2 * 3 * 64 * 4 * (spans[1][1] - spans[1][0])


def test_plan_of_a_7b_config_without_weights(capsys: pytest.CaptureFixture[str]) -> None:
    """docs/configs/llama-7b holds a config.json and nothing else."""
    assert [p.name for p in (ROOT / "docs/configs/llama-7b").iterdir()] == ["config.json"]
    rc, out, err = _plan_here(capsys, "--model", str(ROOT / "docs/configs/llama-7b"), "--strategy", "uniform",
                              "--stages", "2")
    assert rc == 0, err
    assert "trunk       2:16" in out and "top        30:32" in out
    assert "6.61 G" in out  # FLOPs a token of 14 layers at --max-context 4096
    rc, out, err = _plan_here(capsys, "--model", str(ROOT / "docs/configs/llama-7b"), "--client-memory", "100MiB")
    assert rc == 2 and "missing" in err and "Traceback" not in err


def test_gguf_bytes_are_the_files_own(smollm2_path: Path) -> None:
    """--weights gguf counts each tensor as the file stores it (SmolLM2's Q4_1 layers)."""
    config = resolve(str(smollm2_path)).config
    q = model_cost(config, "smollm2", "gguf", gguf=smollm2_path)
    f = model_cost(config, "smollm2", "float32")
    assert q.layers[5].params == f.layers[5].params
    assert f.layers[5].weight_bytes / 7 < q.layers[5].weight_bytes < f.layers[5].weight_bytes / 4  # ~5 bits a weight


def test_a_saved_model_directory_plans(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = save_tiny("llama", tmp_path / "m", num_hidden_layers=9)
    rc, out, err = _plan_here(capsys, "--model", str(d), "--strategy", "compute", "--stages", "2", "--json")
    assert rc == 0, err
    assert [tuple(s["layers"]) for s in json.loads(out)["stages"]] == [(0, 2), (2, 4), (4, 7), (7, 9)]
