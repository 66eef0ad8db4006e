"""The cost model of ``shared.partition``: what each layer of a model holds and costs, from its
config alone (see the package's docstring for what is counted and how). No weights are read; a
GGUF's tensor table is, for ``--weights gguf``."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UsageError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

FLOAT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
"""Bytes a weight of a float precision (and a cache element of that compute dtype) takes."""


@dataclass(frozen=True)
class Tensor:
    """One weight: its shape ``(out, in)`` for a matrix (quantised with its layer), ``(n,)``
    for a vector (a norm, a bias: float32 under int8/int4)."""

    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class LayerCost:
    """What one decoder layer holds and costs.

    Attributes:
        index: the layer's index in the model.
        params: weights (matrices, norms, biases).
        weight_bytes: those weights' bytes at the plan's precision.
        kv_bytes_per_position: keys and values of one cached position.
        kv_positions: positions this layer's cache holds at ``--max-context``.
        flops_per_token: multiply-adds x 2 for one token at ``--max-context``.
        sliding_window: the layer's window (None: full attention).
    """

    index: int
    params: int
    weight_bytes: int
    kv_bytes_per_position: int
    kv_positions: int
    flops_per_token: int
    sliding_window: int | None = None

    @property
    def kv_bytes(self) -> int:
        """The KV cache of one session at ``--max-context``."""
        return self.kv_bytes_per_position * self.kv_positions

    @property
    def memory_bytes(self) -> int:
        """Weights plus one session's KV cache at ``--max-context``: the ``memory`` strategy's cost."""
        return self.weight_bytes + self.kv_bytes


@dataclass(frozen=True)
class EndCost:
    """The embedding (bottom) or the final norm and LM head (top)."""

    params: int
    weight_bytes: int
    flops_per_token: int


@dataclass(frozen=True)
class ModelCost:
    """A model's costs at a precision and context, from its config alone."""

    model: str
    model_type: str
    precision: str
    max_context: int
    layers: tuple[LayerCost, ...]
    embed: EndCost
    head: EndCost
    tied: bool
    default_split: tuple[int, int]
    notes: tuple[str, ...] = ()
    """What the figures rest on, in words (the GGUF's tensor types, a tied head)."""

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def _int(config: Any, *names: str, default: int | None = None) -> int:
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return int(v)
    if default is None:
        raise UsageError(f"the model config has none of {', '.join(names)}: cannot plan it")
    return default


def layer_tensors(config: PretrainedConfig) -> list[Tensor]:
    """The weights of one decoder layer, as the family's modules hold them (names are
    transformers' within the layer)."""
    mt = config.model_type
    h = _int(config, "hidden_size", "n_embd")
    if mt == "gpt2":
        inner = _int(config, "n_inner", default=4 * h)
        return [
            Tensor("ln_1.weight", (h,)), Tensor("ln_1.bias", (h,)),
            Tensor("attn.c_attn.weight", (3 * h, h)), Tensor("attn.c_attn.bias", (3 * h,)),
            Tensor("attn.c_proj.weight", (h, h)), Tensor("attn.c_proj.bias", (h,)),
            Tensor("ln_2.weight", (h,)), Tensor("ln_2.bias", (h,)),
            Tensor("mlp.c_fc.weight", (inner, h)), Tensor("mlp.c_fc.bias", (inner,)),
            Tensor("mlp.c_proj.weight", (h, inner)), Tensor("mlp.c_proj.bias", (h,)),
        ]
    heads = _int(config, "num_attention_heads")
    kv = _int(config, "num_key_value_heads", default=heads)
    hd = _int(config, "head_dim", default=h // heads)
    inter = _int(config, "intermediate_size")
    qkv_bias = mt == "qwen2" or bool(getattr(config, "attention_bias", False))
    o_bias = mt != "qwen2" and bool(getattr(config, "attention_bias", False))
    mlp_bias = bool(getattr(config, "mlp_bias", False))
    out = [
        Tensor("self_attn.q_proj.weight", (heads * hd, h)),
        Tensor("self_attn.k_proj.weight", (kv * hd, h)),
        Tensor("self_attn.v_proj.weight", (kv * hd, h)),
        Tensor("self_attn.o_proj.weight", (h, heads * hd)),
        Tensor("mlp.gate_proj.weight", (inter, h)),
        Tensor("mlp.up_proj.weight", (inter, h)),
        Tensor("mlp.down_proj.weight", (h, inter)),
        Tensor("input_layernorm.weight", (h,)),
        Tensor("post_attention_layernorm.weight", (h,)),
    ]
    if qkv_bias:
        out += [Tensor("self_attn.q_proj.bias", (heads * hd,)), Tensor("self_attn.k_proj.bias", (kv * hd,)),
                Tensor("self_attn.v_proj.bias", (kv * hd,))]
    if o_bias:
        out.append(Tensor("self_attn.o_proj.bias", (h,)))
    if mlp_bias:
        out += [Tensor("mlp.gate_proj.bias", (inter,)), Tensor("mlp.up_proj.bias", (inter,)),
                Tensor("mlp.down_proj.bias", (h,))]
    if mt in ("gemma2", "gemma3_text"):
        out += [Tensor("pre_feedforward_layernorm.weight", (h,)), Tensor("post_feedforward_layernorm.weight", (h,))]
    if mt == "gemma3_text":
        out += [Tensor("self_attn.q_norm.weight", (hd,)), Tensor("self_attn.k_norm.weight", (hd,))]
    return out


def attention_shape(config: PretrainedConfig) -> tuple[int, int, int]:
    """(heads, kv heads, head dim) of any family's config (GPT-2's names included)."""
    h = _int(config, "hidden_size", "n_embd")
    heads = _int(config, "num_attention_heads", "n_head")
    kv = _int(config, "num_key_value_heads", default=heads)
    return heads, kv, _int(config, "head_dim", default=h // heads)


def _matrix_bytes(shape: tuple[int, ...], precision: str, group_size: int, head: bool = False) -> int:
    """Bytes of a matrix at ``precision`` (``int8``/``int4`` as ``shared.models.precision`` packs
    it; the head keeps its own format: ``HEAD_FORMAT_OF``)."""
    from ..models.quant.formats import BLOCK, PackedShape, QuantFormat

    out, inp = shape
    if precision in FLOAT_BYTES:
        return out * inp * FLOAT_BYTES[precision]
    fmt_name = {"int8": "q8_0", "int4": "q4_1"}[precision]
    group = group_size
    if head:
        head_fmt = "q8_0"  # precision.HEAD_FORMAT_OF: 8 bits under int4 too
        if head_fmt != fmt_name:
            group = BLOCK
        fmt_name = head_fmt
    fmt = QuantFormat.parse(fmt_name).with_group(group)
    return out * PackedShape(out, inp, fmt, group if fmt.grouped else BLOCK).row_bytes


def _tensor_bytes(t: Tensor, precision: str, group_size: int) -> int:
    if len(t.shape) == 2 and precision in ("int8", "int4"):
        return _matrix_bytes(t.shape, precision, group_size)
    return t.numel * FLOAT_BYTES.get(precision, 4)  # vectors stay float32 under int8/int4/gguf


def _gguf_layer_bytes(path: Path, num_layers: int) -> tuple[list[int], int, int, dict[str, int]]:
    """Per-layer bytes of a GGUF's tensors as ``--weights gguf`` loads them (quantised tensors
    keep their blocks, F16/F32 ones become float32), the embedding's, the head's (its norm and
    ``output.weight``, absent when tied), and the count of tensors per type. Reads the tensor
    table only (``gguf_file.read_tensors``: a memory map; no tensor is read)."""
    import numpy as np

    from ..models.gguf_file import read_tensors
    from ..models.quant import SUPPORTED_GGUF

    layers = [0] * num_layers
    embed = head = 0
    types: dict[str, int] = {}
    for t in read_tensors(path).tensors:
        kind = t.tensor_type.name
        types[kind] = types.get(kind, 0) + 1
        quantised = kind in SUPPORTED_GGUF
        nbytes = int(t.data.nbytes) if quantised else int(np.prod(_gguf_shape(t))) * 4
        m = re.match(r"blk\.(\d+)\.", t.name)
        if m and int(m.group(1)) < num_layers:
            layers[int(m.group(1))] += nbytes
        elif t.name.startswith(("token_embd", "position_embd")):
            embed += nbytes
        elif t.name.startswith(("output", "output_norm")):
            head += nbytes
    return layers, embed, head, types


def _gguf_shape(t: Any) -> tuple[int, ...]:
    """A GGUF tensor's element shape (a quantised one's data is bytes: its rows x blocks)."""
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[t.tensor_type]
    shape = tuple(int(x) for x in t.data.shape)
    return (*shape[:-1], shape[-1] // size * block)


def sliding_windows(config: PretrainedConfig) -> list[int | None]:
    """Each layer's sliding window (None: full attention), as transformers' own cache sees the
    layers (``shared.cache.layer_types``: the same view the KV cache is built from)."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    types, kwargs = get_layer_types_and_kwargs(config)
    out: list[int | None] = []
    for kind, kw in zip(types, kwargs):
        window = kw.get("sliding_window") if kind in ("sliding_attention", "chunked_attention") else None
        out.append(int(window) if window else None)
    return out


def model_cost(
    config: PretrainedConfig,
    model: str = "",
    precision: str = "float32",
    group_size: int = 32,
    max_context: int | None = None,
    gguf: Path | None = None,
) -> ModelCost:
    """The cost model of a config at a precision (see the module's docstring).

    Args:
        precision: ``float32``, ``bfloat16``, ``int8``, ``int4`` or ``gguf`` (needs ``gguf``).
        group_size: ``--group-size`` of int8/int4.
        max_context: positions per session (None: the model's ``max_position_embeddings``).
        gguf: the GGUF file, for ``gguf`` precision.

    Raises:
        UsageError: ``gguf`` without a GGUF file, an unknown precision, or a config without the
            sizes a plan needs.
    """
    from ..cache import ROLLBACK_DEPTH
    from ..plan import default_split

    if precision not in (*FLOAT_BYTES, "int8", "int4", "gguf"):
        raise UsageError(f"--weights {precision!r} has no cost model: use float32, bfloat16, int8, int4 or gguf")
    if precision == "gguf" and gguf is None:
        raise UsageError(f"--weights gguf keeps a GGUF file's own tensors, but {model or 'this model'} is not a .gguf file")
    n = _int(config, "num_hidden_layers", "n_layer")
    h = _int(config, "hidden_size", "n_embd")
    vocab = _int(config, "vocab_size")
    ctx = max_context or _int(config, "max_position_embeddings", "n_positions", default=8192)
    heads, kv, hd = attention_shape(config)
    cache_bytes = FLOAT_BYTES.get(precision, 4)  # int8/int4/gguf compute (and cache) in float32
    tensors = layer_tensors(config)
    params = sum(t.numel for t in tensors)
    matrix = sum(t.numel for t in tensors if len(t.shape) == 2)
    windows = sliding_windows(config)
    gguf_bytes = _gguf_layer_bytes(gguf, n) if precision == "gguf" and gguf is not None else None
    float_layer = sum(_tensor_bytes(t, precision, group_size) for t in tensors) if gguf_bytes is None else 0
    layers = []
    for i in range(n):
        w = windows[i]
        seen = ctx if w is None else min(ctx, w)
        kept = ctx if w is None else min(ctx, w - 1 + ROLLBACK_DEPTH)
        layers.append(LayerCost(
            index=i, params=params,
            weight_bytes=gguf_bytes[0][i] if gguf_bytes is not None else float_layer,
            kv_bytes_per_position=2 * kv * hd * cache_bytes, kv_positions=kept,
            flops_per_token=2 * matrix + 4 * heads * hd * seen, sliding_window=w,
        ))
    tied = bool(getattr(config, "tie_word_embeddings", config.model_type == "gpt2"))
    embed_params = vocab * h + (_int(config, "n_positions", "max_position_embeddings") * h if config.model_type == "gpt2" else 0)
    norm_params = 2 * h if config.model_type == "gpt2" else h
    head_params = norm_params + (0 if tied else vocab * h)
    if gguf_bytes is not None:
        embed_bytes, head_bytes = gguf_bytes[1], gguf_bytes[2]
    else:
        fb = FLOAT_BYTES.get(precision, 4)
        wte = (_matrix_bytes((vocab, h), precision, group_size, head=True) if tied and precision in ("int8", "int4")
               else vocab * h * fb)
        embed_bytes = wte + (embed_params - vocab * h) * fb
        lm_head = 0 if tied else _matrix_bytes((vocab, h), precision, group_size, head=True)
        head_bytes = norm_params * fb + lm_head
    notes = []
    if gguf_bytes is not None:
        kinds = ", ".join(f"{k} x{v}" for k, v in sorted(gguf_bytes[3].items()))
        notes.append(f"--weights gguf: the file's own tensor types ({kinds}); F16/F32 ones load as float32")
    if tied:
        notes.append("tied head: the LM head is the embedding matrix, counted once at the bottom (its FLOPs at the top)")
    if any(w is not None for w in windows):
        notes.append(f"sliding-window layers hold at most their window + {ROLLBACK_DEPTH} positions of KV")
    return ModelCost(
        model=model, model_type=str(config.model_type),
        precision=precision if precision not in ("int8", "int4") or group_size == 32 else f"{precision}/g{group_size}",
        max_context=ctx, layers=tuple(layers),
        embed=EndCost(embed_params, embed_bytes, 0),
        head=EndCost(head_params, head_bytes, 2 * vocab * h),
        tied=tied, default_split=default_split(n, str(config.model_type)), notes=tuple(notes),
    )
