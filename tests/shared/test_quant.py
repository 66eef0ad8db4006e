"""The quantized-weight kernels: GGUF's bytes read right, products right, and every row's result
independent of the thread count and of the other rows in the call."""

from __future__ import annotations

import platform
import threading
from collections.abc import Iterator
from copy import deepcopy
from pathlib import Path

import numpy as np
import pytest
import torch

from splitlm.shared.errors import UsageError
from splitlm.shared.models.quant import (
    Kernel,
    KernelBuildError,
    QuantEmbedding,
    QuantFormat,
    QuantLinear,
    dequantize_rows,
    quant_linear,
    quantize,
)
from splitlm.shared.models.quant.build import build

FORMATS = [f for f in QuantFormat if f.gguf]
GROUPED = [(QuantFormat.Q4_1, 128), (QuantFormat.Q8_0, 64), (QuantFormat.Q4_1, 256)]
"""--group-size above 32: the numbers of q4_1/q8_0 packed in Q4_1G/Q8_0G."""
EVERY = [(f, 32) for f in FORMATS] + GROUPED


@pytest.fixture
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _layer(out: int, inp: int, fmt: QuantFormat, seed: int = 0, bias: bool = True,
           group_size: int = 32) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    b = torch.randn(out, generator=g) if bias else None
    return QuantLinear.from_float(w, b, fmt, group_size)


@pytest.mark.realmodel
def test_dequantize_equals_gguf_on_smollm2(smollm2_path: Path) -> None:
    from gguf.quants import dequantize as gguf_dequantize

    from splitlm.shared.models.gguf_file import read_tensors

    tensors = {t.name: t for t in read_tensors(smollm2_path).tensors}
    for name in ("token_embd.weight", "blk.0.attn_q.weight", "blk.0.ffn_down.weight",
                 "blk.29.attn_k.weight"):
        t = tensors[name]
        theirs = gguf_dequantize(t.data, t.tensor_type).astype(np.float32)
        layer = QuantLinear.from_blocks(t.data, t.tensor_type.name, *theirs.shape)
        ours = layer.dequantize().numpy()
        assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32)), name
        ids = torch.tensor([[0, 7], [theirs.shape[0] - 1, 3]])
        assert torch.equal(dequantize_rows(layer.packed, layer.fmt, ids, theirs.shape[1]),
                           torch.from_numpy(theirs)[ids]), name
    assert tensors["token_embd.weight"].tensor_type.name == "Q8_0"
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == "Q4_1"


@pytest.mark.parametrize(("fmt", "group"), EVERY)
@pytest.mark.parametrize(("out", "inp"), [(96, 64), (37, 160), (200, 32)])
def test_product_matches_dequantized_matmul(fmt: QuantFormat, group: int, out: int, inp: int) -> None:
    layer = _layer(out, inp, fmt, group_size=group)
    w = layer.dequantize()
    assert layer.bias is not None
    for rows in (1, 2, 5, 17, 64):
        x = torch.randn(rows, inp)
        torch.testing.assert_close(layer(x), x @ w.T + layer.bias, rtol=1e-5, atol=1e-4)
    x3 = torch.randn(2, 3, inp)
    assert layer(x3).shape == (2, 3, out)


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_weight_is_close_to_float(fmt: QuantFormat) -> None:
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    err = (QuantLinear.from_float(w, None, fmt).dequantize() - w).pow(2).mean() / w.pow(2).mean()
    assert err < (1e-4 if fmt is QuantFormat.Q8_0 else 1e-2)


@pytest.mark.parametrize("fmt", FORMATS)
def test_odd_in_features_are_padded_exactly(fmt: QuantFormat) -> None:
    layer = _layer(24, 50, fmt)  # 50 weights: two blocks, the second padded with 14 zeros
    assert layer.packed.shape == (24, 2 * fmt.block_bytes)
    w = layer.dequantize()
    assert w.shape == (24, 50)
    x = torch.randn(3, 50)
    assert layer.bias is not None
    torch.testing.assert_close(layer(x), x @ w.T + layer.bias, rtol=1e-5, atol=1e-4)
    with pytest.raises(UsageError, match="width"):
        layer(torch.randn(3, 64))  # the padded width is not an input width
    with pytest.raises(UsageError, match="multiple"):
        QuantLinear.from_blocks(layer.packed, fmt, 24, 50)  # GGUF bytes always hold whole blocks
    with pytest.raises(UsageError, match="group size"):
        quantize(torch.randn(4, 64), fmt, group_size=64)  # GGUF's formats: 32 only (q4_1g is 64's)


@pytest.mark.parametrize(("fmt", "group"), EVERY)
def test_rows_do_not_depend_on_threads_or_batch(fmt: QuantFormat, group: int, one_thread: None) -> None:
    layer = _layer(1000, 576, fmt, group_size=group)  # 63 tiles of 16 outputs: uneven across threads
    x = torch.randn(13, 576)
    solo = torch.cat([quant_linear(x[i : i + 1], layer.packed, layer.shape, layer.bias, threads=1)
                      for i in range(13)])
    for threads in (1, 2, 3):
        batched = quant_linear(x, layer.packed, layer.shape, layer.bias, threads=threads)
        assert torch.equal(batched, solo), threads
    for n in (1, 2):  # and through the module, under torch's thread setting
        torch.set_num_threads(n)
        assert torch.equal(layer(x), solo)
        assert torch.equal(layer(x[5:9]), solo[5:9])


def test_bfloat16_input_and_module_moves() -> None:
    layer = _layer(48, 64, QuantFormat.Q4_1)
    x = torch.randn(4, 64)
    y = layer(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x.to(torch.bfloat16).float()).to(torch.bfloat16).float())
    layer.to(torch.bfloat16)  # floats follow, the packed bytes stay uint8
    assert layer.packed.dtype == torch.uint8
    torch.testing.assert_close(layer(x).float(), _layer(48, 64, QuantFormat.Q4_1)(x), atol=0.05, rtol=0.01)
    copy = QuantLinear(64, 48, "q4_1", torch.zeros(48, 2 * 20, dtype=torch.uint8), torch.zeros(48))
    copy.load_state_dict(_layer(48, 64, QuantFormat.Q4_1).state_dict())
    assert torch.equal(copy(x), _layer(48, 64, QuantFormat.Q4_1)(x))
    assert copy.packed.data_ptr() % 64 == 0
    assert copy.nbytes == 48 * 40 + 48 * 4
    twin = deepcopy(copy)  # after a forward: the cached kernel arguments are not copied
    assert twin.packed.data_ptr() != copy.packed.data_ptr()
    assert torch.equal(twin(x), copy(x))


def test_bad_input_is_refused() -> None:
    layer = _layer(8, 64, QuantFormat.Q8_0)
    with pytest.raises(UsageError, match="width"):
        layer(torch.randn(2, 63))
    with pytest.raises(UsageError, match="float32 or bfloat16"):
        layer(torch.randn(2, 64, dtype=torch.float64))
    with pytest.raises(UsageError, match="unknown quantized format"):
        QuantFormat.parse("q5_k")
    with pytest.raises(UsageError, match="uint8 of shape"):
        QuantLinear(64, 8, "q8_0", torch.zeros(8, 33, dtype=torch.uint8))


def test_build_is_cached_and_safe_to_race(tmp_path: Path) -> None:
    results: list[Kernel] = []
    racers = [threading.Thread(target=lambda: results.append(build(directory=tmp_path))) for _ in range(2)]
    for t in racers:
        t.start()
    for t in racers:
        t.join()
    assert len(results) == 2 and results[0].path == results[1].path
    again = build(directory=tmp_path)
    assert not again.compiled and again.path == results[0].path
    assert [p.name for p in tmp_path.iterdir()] == [again.path.name]  # no temp file left behind


def test_missing_compiler_is_a_usage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "no-such-cc")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(KernelBuildError, match="C compiler"):
        build(directory=tmp_path)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 targets")
@pytest.mark.parametrize(("march", "isa"), [("x86-64-v3", "avx2"), ("x86-64", "scalar")])
def test_avx2_and_portable_paths(march: str, isa: str, tmp_path: Path) -> None:
    lib = build(march, directory=tmp_path)
    assert lib.isa == isa
    for fmt, group in EVERY:
        layer = _layer(40, 160, fmt, group_size=group)  # at 128: a group of 4 blocks and one of 1
        x = torch.randn(11, 160)
        shape = layer.shape
        y = quant_linear(x, layer.packed, shape, layer.bias, threads=2, lib=lib)
        torch.testing.assert_close(y, layer(x), rtol=1e-5, atol=1e-4)
        solo = torch.cat([quant_linear(x[i : i + 1], layer.packed, shape, layer.bias, threads=1, lib=lib)
                          for i in range(11)])
        assert torch.equal(y, solo)


def test_tied_embedding_shares_the_head_bytes() -> None:
    head = _layer(100, 50, QuantFormat.Q8_0, bias=False)
    emb = QuantEmbedding.from_linear(head)
    assert emb.packed.data_ptr() == head.packed.data_ptr()
    ids = torch.tensor([[3, 99, 3]])
    assert torch.equal(emb(ids), head.dequantize()[ids])
    with pytest.raises(UsageError, match="token ids"):
        emb(torch.tensor([100]))


@pytest.mark.parametrize(("fmt", "group"), GROUPED)
def test_grouped_formats_take_fewer_bytes_and_keep_each_groups_scale(fmt: QuantFormat, group: int) -> None:
    """576 inputs (SmolLM2's hidden size) at 128: four groups of 128 and a short one of 64."""
    w = torch.randn(24, 576, generator=torch.Generator().manual_seed(3))
    layer = QuantLinear.from_float(w, None, fmt, group)
    assert layer.fmt is fmt.with_group(group) and layer.fmt.grouped and layer.group_size == group
    groups = -(-576 // group)
    values = 576 // 2 if fmt is QuantFormat.Q4_1 else 576
    assert layer.packed.shape == (24, values + groups * layer.fmt.scale_bytes)
    assert layer.nbytes < QuantLinear.from_float(w, None, fmt).nbytes
    # a group is quantized on its own: the short last group as if it were a matrix by itself
    last = (groups - 1) * group
    alone = QuantLinear.from_float(w[:, last:], None, fmt, group).dequantize()
    assert torch.equal(layer.dequantize()[:, last:], alone)
    # at 32 the grouped layout holds the very numbers of GGUF's block format
    as32 = QuantLinear(576, 24, layer.fmt, quantize(w, layer.fmt, 32), None, 32)
    assert torch.equal(as32.dequantize(), QuantLinear.from_float(w, None, fmt).dequantize())
    err = (layer.dequantize() - w).pow(2).mean() / w.pow(2).mean()
    assert err < (1e-4 if fmt is QuantFormat.Q8_0 else 2e-2)
    emb = QuantEmbedding.from_linear(layer)
    ids = torch.tensor([[0, 23, 5]])
    assert torch.equal(emb(ids), layer.dequantize()[ids])
    x = torch.randn(3, 576)
    torch.testing.assert_close(layer(x), x @ layer.dequantize().T, rtol=1e-5, atol=1e-4)


def test_bad_group_sizes_are_refused() -> None:
    w = torch.randn(4, 64)
    with pytest.raises(UsageError, match="q4_0 has one scale per block"):
        QuantLinear.from_float(w, None, "q4_0", 64)
    with pytest.raises(UsageError, match="not a multiple of 32"):
        QuantLinear.from_float(w, None, "q4_1", 48)
    layer = QuantLinear.from_float(w, None, "q8_0", 64)
    with pytest.raises(UsageError, match="not a GGUF tensor type"):
        QuantLinear.from_blocks(layer.packed, layer.fmt, 4, 64)
    with pytest.raises(UsageError, match="one scale per block"):
        dequantize_rows(layer.packed, "q8_0", torch.tensor([0]), 64, 64)
