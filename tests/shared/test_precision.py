"""``--weights``: split equals full at each precision, in one process; resolution rules; fingerprint."""

from __future__ import annotations

import pytest
import torch

from splitlm.shared.errors import UsageError
from splitlm.shared.generation import GenerationSettings, LocalPipeline, generate
from splitlm.shared.models import PartChain, PartSpec, build_parts, family_for, resolve
from splitlm.shared.models.precision import (
    Precision,
    client_weights,
    precision_named,
    resolve_precision,
)
from splitlm.shared.models.quant import QuantLinear
from splitlm.shared.models.quantize import quantized_count
from splitlm.shared.plan import Fingerprint
from tests.shared.test_engine import PROMPT, _InProcessSplit, _NoText

CPU = torch.device("cpu")


def _parts(path, plan: tuple[int, int], precision: Precision):  # type: ignore[no-untyped-def]
    src = resolve(str(path))
    fam = family_for(src.config)
    L = src.config.num_hidden_layers
    a, b = plan
    specs = [PartSpec.bottom(a), PartSpec.trunk(a, b), PartSpec.top(b, L), PartSpec.full(L)]
    parts = build_parts(src, fam, specs, precision.dtype, CPU, precision)
    return src, parts


@pytest.mark.parametrize(("kind", "weights"), [
    ("gpt2", "bfloat16"), ("gpt2", "int8"), ("gpt2", "int4"),  # GPT-2: Conv1D layers, biases
    ("llama", "int4"), ("gemma2", "bfloat16"), ("gemma2", "int8"),  # each precision on 2 families or more
    ("llama", "int4/g128"), ("gemma2", "int8/g64"),  # --group-size: the grouped q4_1g and q8_0g
])
def test_split_equals_full_at_the_same_precision(tiny_models, kind, weights) -> None:  # type: ignore[no-untyped-def]
    precision = precision_named(weights, CPU)
    src, parts = _parts(tiny_models[kind], (2, 4), precision)
    settings = GenerationSettings(max_new_tokens=24)
    # no EOS: all 24 tokens are compared (random tiny models may emit EOS early)
    split = generate(_InProcessSplit(parts[:3]), _NoText(), list(PROMPT), settings, [])
    full = generate(LocalPipeline(parts[3]), _NoText(), list(PROMPT), settings, [])
    assert split.token_ids == full.token_ids
    assert len(full.token_ids) == 24
    if weights != "bfloat16":  # the decoder layers and the head really run quantised
        n_linear = 4 if kind == "gpt2" else 7  # per decoder layer: attention + MLP projections
        assert quantized_count(parts[1].model) == 2 * n_linear  # the trunk's 2 layers
        assert quantized_count(parts[3].model) == 6 * n_linear + 1  # all 6 of the full model's + the head
        assert quantized_count(parts[2].model) == 2 * n_linear + 1
        assert {p.dtype for p in parts[3].model.parameters()} == {torch.float32}  # norms stay float32
        group = precision.group_size  # the layers really hold the grouped bytes at --group-size
        layers = parts[3].model.model.layers if kind != "gpt2" else parts[3].model.transformer.h
        layouts = {(m.fmt.grouped, m.group_size) for m in layers.modules() if isinstance(m, QuantLinear)}
        assert layouts == {(group != 32, group)}
        head = parts[3].model.get_output_embeddings()  # 8 bits at the format's own group under int4
        assert (head.fmt.label, head.group_size) == (("q8_0", 32) if weights.startswith("int4") else (head.fmt.label, group))
    else:
        assert {p.dtype for p in parts[3].model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_quantised_changes_the_output_and_float32_does_not_quantise(tiny_models, weights) -> None:  # type: ignore[no-untyped-def]
    """The test above could pass with quantisation a no-op: quantised logits differ from float32's."""
    f32 = precision_named("float32", CPU)
    _, [_, trunk32, *_] = _parts(tiny_models["llama"], (2, 4), f32)
    _, [_, trunk_q, *_] = _parts(tiny_models["llama"], (2, 4), precision_named(weights, CPU))
    h = torch.randn(1, 5, trunk32.hidden_size, generator=torch.Generator().manual_seed(0))
    a = trunk32.forward(h, 0, trunk32.new_cache())
    b = trunk_q.forward(h, 0, trunk_q.new_cache())
    assert not torch.equal(a, b)
    assert torch.allclose(a, b, atol=0.3, rtol=0.2)  # close, not garbage
    assert quantized_count(trunk32.model) == 0
    # the quantised embedding lookup keeps Gemma's scaling (sqrt(hidden)): close to float32's
    _, [bottom32, *_] = _parts(tiny_models["gemma2"], (2, 4), f32)
    _, [bottom_q, *_] = _parts(tiny_models["gemma2"], (2, 4), precision_named(weights, CPU))
    ids = torch.tensor([list(PROMPT)])
    with torch.inference_mode():
        e32 = bottom32.family.embed(bottom32.model, ids, torch.arange(ids.shape[1])[None])
        eq = bottom_q.family.embed(bottom_q.model, ids, torch.arange(ids.shape[1])[None])
    assert type(bottom_q.model.get_input_embeddings()).__name__ == "ScaledQuantEmbedding"
    assert torch.allclose(e32, eq, atol=0.2 * float(e32.abs().max()))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_each_side_its_own_precision(tiny_models, kind) -> None:  # type: ignore[no-untyped-def]
    """Bottom and top at int4 around a float32 or bfloat16 trunk: the split equals the full model
    run as a chain at the same per-part assignment, which is not the uniform int4 model."""
    here = precision_named("int4", CPU)
    src = resolve(str(tiny_models[kind]))
    fam = family_for(src.config)
    L = src.config.num_hidden_layers
    bottom, top = build_parts(src, fam, [PartSpec.bottom(2), PartSpec.top(4, L)], here.dtype, CPU, here)
    settings = GenerationSettings(max_new_tokens=16)
    for tw in ("float32", "bfloat16"):
        t = precision_named(tw, CPU)
        [trunk] = build_parts(src, fam, [PartSpec.trunk(2, 4)], t.dtype, CPU, t)
        split = generate(_InProcessSplit([bottom, trunk, top]), _NoText(), list(PROMPT), settings, [])
        chain = generate(LocalPipeline(PartChain([bottom, trunk, top])), _NoText(), list(PROMPT), settings, [])
        assert split.token_ids == chain.token_ids and len(chain.token_ids) == 16
    h = torch.tensor([list(PROMPT)])
    [trunk32] = build_parts(src, fam, [PartSpec.trunk(2, 4)], torch.float32, CPU)
    chain = PartChain([bottom, trunk32, top])
    mixed = chain.forward(h, 0, chain.new_cache())
    _, uniform = _parts(tiny_models[kind], (2, 4), here)
    assert not torch.equal(mixed, uniform[3].forward(h, 0, uniform[3].new_cache()))  # the trunk ran float32


def test_a_chain_must_run_from_embedding_to_head(tiny_models) -> None:  # type: ignore[no-untyped-def]
    _, parts = _parts(tiny_models["llama"], (2, 4), precision_named("float32", CPU))
    with pytest.raises(ValueError, match="from the embedding to the head"):
        PartChain(parts[1:3])
    with pytest.raises(ValueError, match="ends at layer 2"):
        PartChain([parts[0], parts[2]])


def test_gpt2_conv1d_becomes_an_equal_linear(tiny_models) -> None:  # type: ignore[no-untyped-def]
    from splitlm.shared.models.precision import conv1d_to_linear

    _, [_, trunk, *_] = _parts(tiny_models["gpt2"], (2, 4), precision_named("float32", CPU))
    h = torch.randn(1, 4, trunk.hidden_size, generator=torch.Generator().manual_seed(1))
    want = trunk.forward(h, 0, trunk.new_cache())
    for i in range(2, 4):
        conv1d_to_linear(trunk.model.transformer.h[i])
    assert isinstance(trunk.model.transformer.h[2].attn.c_attn, torch.nn.Linear)
    torch.testing.assert_close(trunk.forward(h, 0, trunk.new_cache()), want)


@pytest.mark.parametrize(
    ("weights", "dtype", "explicit", "want"),
    [
        (None, torch.float32, False, Precision("float32", torch.float32)),
        ("auto", torch.bfloat16, True, Precision("bfloat16", torch.bfloat16)),
        ("bfloat16", torch.float32, False, Precision("bfloat16", torch.bfloat16)),
        ("int8", torch.float32, False, Precision("int8", torch.float32)),
        ("int8", torch.float32, True, Precision("int8", torch.float32)),
        ("int4", torch.float32, False, Precision("int4", torch.float32)),
        ("gguf", torch.float32, False, Precision("gguf", torch.float32)),
    ],
)
def test_resolve_precision(weights, dtype, explicit, want) -> None:  # type: ignore[no-untyped-def]
    assert resolve_precision(weights, dtype, explicit, CPU) == want


@pytest.mark.parametrize(
    ("weights", "dtype", "device", "needle"),
    [
        ("bfloat16", torch.float32, "cpu", "--dtype says float32"),
        ("int8", torch.bfloat16, "cpu", "computes in float32"),
        ("int8", torch.float32, "cuda", "CPU only"),
        ("int4", torch.float32, "cuda", "CPU only; use --weights bfloat16"),
        ("gguf", torch.float32, "cuda", "CPU only"),
        ("int3", torch.float32, "cpu", "one of auto, float32, bfloat16, int8, int4, gguf"),
    ],
)
def test_resolve_precision_refuses(weights, dtype, device, needle) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UsageError, match=needle):
        resolve_precision(weights, dtype, True, torch.device(device))


def test_group_size_is_named_in_the_tag_and_checked() -> None:
    assert resolve_precision("int4", torch.float32, False, CPU, 32).tag == "int4"
    p = resolve_precision("int4", torch.float32, False, CPU, 128)
    assert p.tag == "int4/g128" and precision_named("int4/g128", CPU) == p
    assert resolve_precision("bfloat16", torch.float32, False, CPU, 128).tag == "bfloat16"
    with pytest.raises(UsageError, match="--group-size must be one of 32, 64, 128, 256"):
        resolve_precision("int8", torch.float32, False, CPU, 48)


def test_gguf_weights_need_a_gguf_model(tiny_models) -> None:  # type: ignore[no-untyped-def]
    from splitlm.shared.models.precision import check_source

    with pytest.raises(UsageError, match="is not a .gguf model: use --weights int4 or int8"):
        check_source(precision_named("gguf", CPU), resolve(str(tiny_models["llama"])))
    check_source(precision_named("int4", CPU), resolve(str(tiny_models["llama"])))  # anything else: no check


def test_unsupported_gguf_quantisation_is_refused_before_loading(tmp_path, tiny_models) -> None:  # type: ignore[no-untyped-def]
    """A GGUF holding a format the kernels do not run (Q6_K, written here with the gguf package)
    is refused from its tensor table alone, naming the format and the ones that run."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

    from splitlm.shared.models.precision import check_source
    from splitlm.shared.models.source import ModelSource

    path = tmp_path / "k.gguf"
    w = GGUFWriter(str(path), "llama")
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType.Q6_K]
    w.add_tensor("blk.0.ffn_up.weight", np.zeros((64, 256 // block * size), np.uint8),
                 raw_dtype=GGMLQuantizationType.Q6_K)
    w.add_tensor("blk.0.attn_norm.weight", np.ones(256, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    config = resolve(str(tiny_models["llama"])).config
    source = ModelSource(spec=str(path), kind="gguf", path=path, config=config, _weights_digest="x")
    with pytest.raises(UsageError, match=r"Q6_K, which splitlm cannot keep quantised \(it runs Q4_0, Q4_1, Q8_0"):
        check_source(precision_named("gguf", CPU), source)


def test_client_weights_takes_flag_then_dtype_then_the_daemons() -> None:
    assert client_weights("int8", "float32") == "int8"
    assert client_weights(None, "bfloat16") == "bfloat16"
    assert client_weights("auto", "auto") is None
    assert client_weights(None, None) is None


def test_fingerprint_carries_the_precision() -> None:
    base = Fingerprint("c", "w", 2, 4)
    assert Fingerprint("c", "w", 2, 4, "float32").digest == base.digest  # float32 digests unchanged
    digests = {Fingerprint("c", "w", 2, 4, p).digest for p in ("float32", "bfloat16", "int8")}
    assert len(digests) == 3
    diff = Fingerprint("c", "w", 2, 4, "float32").differences(Fingerprint("c", "w", 2, 4, "int8"))
    assert diff == ["weight precision (int8 here, float32 from the client): pass --weights int8"]


def test_weights_and_wire_dtype_are_layered_settings(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """flag > SPLITLM_* > TOML > default, for the daemon and the client; bad values are named."""
    from splitlm.shared.config import ClientSettings, ConfigError, DaemonSettings, load
    from splitlm.tui import cli

    f = tmp_path / "c.toml"
    f.write_text('weights = "bfloat16"\nwire_dtype = "float16"\n')
    t = tmp_path / "trunkd.toml"
    t.write_text('weights = "bfloat16"\n')
    d = load(DaemonSettings, {}, env={"SPLITLM_WEIGHTS": "int8"}, config=t)
    assert d.settings.weights == "int8" and d.sources["weights"] == "SPLITLM_WEIGHTS"
    assert load(DaemonSettings, {}, env={}, config=t).settings.weights == "bfloat16"
    assert load(DaemonSettings, {"weights": "float32"}, env={"SPLITLM_WEIGHTS": "int8"}).settings.weights == "float32"
    assert load(DaemonSettings, {}, env={}, config=None).settings.weights == "auto"
    c = load(ClientSettings, {"weights": "float32"}, env={"SPLITLM_WIRE_DTYPE": "bfloat16"}, config=f,
             file_name="client")
    assert (c.settings.weights, c.settings.wire_dtype) == ("float32", "bfloat16")
    c = load(ClientSettings, {}, env={}, config=f, file_name="client")
    assert (c.settings.weights, c.settings.wire_dtype) == ("bfloat16", "float16")
    c = load(ClientSettings, {}, env={}, config=None, file_name="client")
    assert (c.settings.weights, c.settings.wire_dtype) == ("auto", "exact")
    with pytest.raises(ConfigError, match="SPLITLM_WIRE_DTYPE"):
        load(ClientSettings, {}, env={"SPLITLM_WIRE_DTYPE": "int8"}, file_name="client")
    # the CLI turns them into what the session code takes
    args = cli.build_parser().parse_args(["generate", "--config", str(f), "--wire-dtype", "exact", "hi"])
    cli._apply_config(args)
    assert cli._weights(args) == "bfloat16" and cli._wire_dtype(args) is None
    args = cli.build_parser().parse_args(["compare", "--config", str(f), "hi"])
    cli._apply_config(args)
    assert cli._wire_dtype(args) == torch.float16


def test_chat_config_takes_weights_and_wire_dtype() -> None:
    from splitlm.tui.app.config import AppConfig

    assert AppConfig("unix:x").local_weights() is None and AppConfig("unix:x").wire_torch_dtype() is None
    c = AppConfig("unix:x", dtype="bfloat16", wire_dtype="bfloat16")
    assert c.local_weights() == "bfloat16" and c.wire_torch_dtype() == torch.bfloat16
    assert AppConfig("unix:x", weights="int8", dtype="float32").local_weights() == "int8"
