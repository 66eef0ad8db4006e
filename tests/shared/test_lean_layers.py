"""The lean layer step (``llama.lean_layer``) computes exactly what transformers' layer modules do."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from splitlm.shared.cache import PartCache
from splitlm.shared.models import PartSpec, build_parts, family_for, llama, resolve
from splitlm.shared.models.decoder import RotaryDecoderFamily, StepInputs
from splitlm.shared.models.llama import LlamaFamily
from splitlm.shared.models.rows import RowsCache


class _ModuleLayers(LlamaFamily):
    """The Llama family with every layer called as transformers' module (the lean step off)."""

    def run_layer(
        self, layer: nn.Module, h: torch.Tensor, step: StepInputs, cache: PartCache | RowsCache
    ) -> torch.Tensor:
        return RotaryDecoderFamily.run_layer(self, layer, h, step, cache)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_lean_layers_equal_the_layer_modules_bit_for_bit(tiny_models, kind, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Prefill, 12 decode steps (past the sliding window of qwen2 and mistral: masks appear),
    a 3-position verification step and a rollback: identical logits, and identical caches."""
    calls = []
    real = llama.lean_layer

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(llama, "lean_layer", counted)
    src = resolve(str(tiny_models[kind]))
    fam = family_for(src.config)
    assert isinstance(fam, LlamaFamily)
    (lean,) = build_parts(src, fam, [PartSpec.full(6)], torch.float32, torch.device("cpu"))
    plain = copy.copy(lean)
    plain.family = _ModuleLayers()
    a_cache, b_cache = lean.new_cache(), plain.new_cache()
    prompt = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])
    a, b = lean.forward(prompt, 0, a_cache), plain.forward(prompt, 0, b_cache)
    assert torch.equal(a, b)
    for p in range(8, 20):
        tok = a[:, -1:].argmax(-1)  # (1, 1)
        a, b = lean.forward(tok, p, a_cache), plain.forward(tok, p, b_cache)
        assert torch.equal(a, b), p
    chunk = torch.tensor([[9, 8, 7]])
    a, b = lean.forward(chunk, 16, a_cache, logits_for=3), plain.forward(chunk, 16, b_cache, logits_for=3)
    assert torch.equal(a, b)
    for i in range(6):
        assert torch.equal(a_cache.layers[i].keys, b_cache.layers[i].keys)
        assert torch.equal(a_cache.layers[i].values, b_cache.layers[i].values)
    assert len(calls) == 6 * 14  # every layer of every step ran lean


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_fused_products_are_views_of_one_matrix(tiny_models, kind) -> None:  # type: ignore[no-untyped-def]
    """q/k/v (bias-free only: qwen2's have biases) and gate/up share one matrix; quantizing a
    layer (its weights replaced) falls back to the separate products, with the same logits."""
    src = resolve(str(tiny_models[kind]))
    (part,) = build_parts(src, family_for(src.config), [PartSpec.full(6)], torch.float32, torch.device("cpu"))
    layer = part.model.model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    storage = mlp.gate_proj.weight.untyped_storage().data_ptr()
    assert mlp.up_proj.weight.untyped_storage().data_ptr() == storage
    assert getattr(mlp, llama.FUSED).matrix((mlp.gate_proj, mlp.up_proj)) is not None
    fused_qkv = getattr(attn, llama.FUSED)
    assert (fused_qkv is None) == (kind == "qwen2")
    ids = torch.tensor([[5, 17, 42, 99]])
    cache = part.new_cache()
    part.forward(ids, 0, cache)
    before = part.forward(torch.tensor([[7]]), 4, cache)
    mlp.up_proj.weight = nn.Parameter(mlp.up_proj.weight.detach().clone())  # as a quantizer replaces it
    assert getattr(mlp, llama.FUSED).matrix((mlp.gate_proj, mlp.up_proj)) is None
    assert torch.equal(part.forward(torch.tensor([[7]]), 4, cache), before)
