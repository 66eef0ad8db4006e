"""The bandwidth floor's byte count (``tui/bench/floor.py``) on tiny random models: every weight a
decode step reads, counted from the loaded tensors, equals the sum taken straight from the saved
checkpoint; the probe returns figures. Nothing asserts a time."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from splitlm.shared.models import PartSpec, build_parts, family_for, resolve
from splitlm.tui.bench import floor


def _full(path: Path, dtype: torch.dtype = torch.float32):  # type: ignore[no-untyped-def]
    source = resolve(str(path))
    n = int(source.config.num_hidden_layers)
    return build_parts(source, family_for(source.config), [PartSpec.full(n)], dtype, torch.device("cpu"))[0]


def _checkpoint(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_llama_bytes_are_the_checkpoint_sum(tiny_models: dict[str, Path]) -> None:
    full = _full(tiny_models["llama"])
    sd = _checkpoint(tiny_models["llama"])
    layer = {i: sum(t.numel() * 4 for k, t in sd.items() if k.startswith(f"model.layers.{i}.")) for i in range(6)}
    emb = sd["model.embed_tokens.weight"]
    # an untied head: the LM head matrix and the final norm, once
    head = sd["model.norm.weight"].numel() * 4 + sd.get("lm_head.weight", emb).numel() * 4
    got = floor.decode_bytes(full)
    assert got.layers == sum(layer.values())
    assert got.embed == emb.shape[1] * 4  # one row, not the matrix
    assert got.head == head
    assert got.weights == sum(layer.values()) + emb.shape[1] * 4 + head
    # KV: keys and values of 2 heads x 16 dims per layer, float32
    assert got.kv_per_position == 6 * 2 * 2 * 16 * 4
    parts = floor.split_bytes(full, 2, 4)
    assert parts["full"] == got
    assert parts["trunk"].layers == layer[2] + layer[3] and parts["trunk"].embed == parts["trunk"].head == 0
    assert parts["client"].layers == layer[0] + layer[1] + layer[4] + layer[5]
    assert parts["client"].embed == got.embed and parts["client"].head == got.head
    assert parts["client"].weights + parts["trunk"].weights == got.weights


def test_gpt2_counts_both_embedding_rows_and_the_tied_head(tiny_models: dict[str, Path]) -> None:
    full = _full(tiny_models["gpt2"])
    sd = _checkpoint(tiny_models["gpt2"])
    got = floor.decode_bytes(full)
    assert got.embed == 2 * 64 * 4  # a row of wte and one of wpe
    ln_f = sum(sd[k].numel() * 4 for k in ("transformer.ln_f.weight", "transformer.ln_f.bias"))
    assert got.head == ln_f + sd["transformer.wte.weight"].numel() * 4  # the head is wte, read whole
    # layers: the checkpoint's tensors (Conv1D weights, biases, norms); no non-persistent buffers
    want = sum(t.numel() * 4 for k, t in sd.items() if k.startswith("transformer.h.") and not k.endswith(".attn.bias"))
    assert got.layers == want


def test_bfloat16_halves_and_a_declared_nbytes_wins(tiny_models: dict[str, Path]) -> None:
    f32 = floor.decode_bytes(_full(tiny_models["llama"]))
    bf16_part = _full(tiny_models["llama"], torch.bfloat16)
    bf16 = floor.decode_bytes(bf16_part)
    assert 2 * bf16.layers == f32.layers and 2 * bf16.head == f32.head and 2 * bf16.kv_per_position == f32.kv_per_position
    # a module that packs its weights its own way (a future quantized linear) is taken at its word
    proj = bf16_part.model.model.layers[0].mlp.down_proj
    before = floor.module_bytes(proj)
    proj.nbytes = 1000
    assert floor.decode_bytes(bf16_part).layers == bf16.layers - before + 1000


def test_quantised_weights_count_their_packed_bytes(tiny_models: dict[str, Path]) -> None:
    from splitlm.shared.models.precision import precision_named

    f32 = floor.decode_bytes(_full(tiny_models["llama"]))
    int8 = precision_named("int8", torch.device("cpu"))
    source = resolve(str(tiny_models["llama"]))
    n = int(source.config.num_hidden_layers)
    part = build_parts(source, family_for(source.config), [PartSpec.full(n)], torch.float32, torch.device("cpu"), int8)[0]
    q = floor.decode_bytes(part)
    linear = sum(m.in_features * m.out_features for m in part.model.model.layers.modules()
                 if type(m).__name__ == "QuantLinear")
    # each linear weight: 34 bytes per block of 32 (q8_0) instead of 4 bytes a weight
    assert q.layers == f32.layers - 4 * linear + linear * 34 // 32
    head = part.model.get_output_embeddings()
    assert q.head == f32.head - 4 * head.in_features * head.out_features + head.nbytes
    tied = bool(getattr(source.config, "tie_word_embeddings", False))
    # a tied table is the head's packed rows; an untied embedding stays float32
    assert q.embed == (head.nbytes // head.out_features if tied else f32.embed)


def test_probe_and_summary() -> None:
    bw = floor.probe_bandwidth(read_bytes=1 << 20, matvec_bytes=8 << 20, repeats=2)
    assert bw["read_bytes_per_s"] > 0 and bw["matvec_bytes_per_s"] > 0
    assert bw["bytes_per_s"] == max(bw["read_bytes_per_s"], bw["matvec_bytes_per_s"])
    parts = {"full": floor.DecodeBytes(900, 50, 50, 10), "client": floor.DecodeBytes(100, 50, 50, 2)}
    fixed = floor.Bandwidth(**{**bw, "bytes_per_s": 1000.0})  # type: ignore[typeddict-item]
    s = floor.summarise(fixed, parts, {"full_decode": ("full", 2.0), "client_part": ("client", float("nan"))})
    assert s["floor_s"] == {"full": 1.0, "client": 0.2}
    assert s["over_floor"]["full_decode"] == 2.0
    assert s["over_floor"]["client_part"] != s["over_floor"]["client_part"]  # not measured: NaN
    assert [r[0] for r in floor.table_rows(None)] == []
