"""Partition strategies: where to cut a model into stages, from its config alone (no weights).

Who calls it: ``splitlm plan`` (prints a plan), ``splitlm-trunkd --split auto`` (takes its trunk
range from one) and ``splitlm-trunkd --devices A,B`` (cuts its trunk range over devices).

The cost model (``model_cost``) counts, per decoder layer, what the config says it holds:

- parameters: attention ``q`` (hidden x heads*head_dim), ``k`` and ``v`` (hidden x
  kv_heads*head_dim: GQA/MQA shrink them), ``o``, their biases when the family has them
  (Qwen2's q/k/v, ``attention_bias``), the MLP (gated: gate, up, down = 3 x hidden x
  intermediate for Llama/Gemma; GPT-2: c_fc + c_proj with biases), the norms (RMSNorm weights;
  GPT-2's LayerNorm weight + bias; Gemma 2/3's four; Gemma 3's q/k norms);
- bytes at a precision: float32 4 B a weight, bfloat16 2 B; ``int8`` packs each matrix of a
  layer in q8_0 (34 B per 32 weights of a row, rows padded to 32), ``int4`` in q4_1 (20 B per 32)
  or, at ``--group-size`` G > 32, the grouped q8_0g/q4_1g (values, then 2 or 4 B per group);
  norms and biases stay float32 (``shared.models.quant.formats.PackedShape`` gives the row bytes);
  ``gguf``: the file's own tensor types, read from its tensor table (quantised tensors keep their
  bytes, F16/F32 ones load as float32);
- KV bytes per position: 2 x kv_heads x head_dim x the cache dtype's bytes (float32 but for
  bfloat16); a sliding-window layer (Gemma 2/3, Mistral's ``sliding_window``) holds at most its
  window plus ``shared.cache.ROLLBACK_DEPTH`` positions, whatever the context;
- FLOPs per token: 2 x the layer's matrix weights (a multiply and an add each) plus attention over
  the context a token sees at ``--max-context`` (2 x heads x head_dim for the scores and as many
  for the weighted sum, per position attended: the last token of a full context, the window for
  a sliding layer);
- the bottom stage (the client's) holds the embedding (and GPT-2's position embedding), the top
  stage the final norm and the LM head (the embedding matrix again when tied: the client holds it
  once, so a tied head adds no bytes to the top when both ends are one client).

Strategies (``STRATEGIES``) cut the trunk into stages, one per trunk stage (``--stages N``) or per
device (``--devices``):

- ``uniform``: as many layers each (the first stages take one more when it does not divide);
- ``memory``: balance weights + the KV cache of one session at ``--max-context``;
- ``compute``: balance FLOPs per token;
- ``mixed``: balance ``MIXED_MEMORY_WEIGHT`` x the layer's share of all trunk memory plus
  ``1 - MIXED_MEMORY_WEIGHT`` x its share of all trunk FLOPs (so a stage that is light on one and
  heavy on the other counts half of each);
- ``custom``: the trunk stages given (``--layers 2:15,15:28``), checked to tile.

Balancing is exact, not greedy: among all contiguous cuts, the one whose largest stage cost
(divided by the stage's device share, when devices of different sizes are given) is smallest
(dynamic programming over layers x stages; among equal cuts the earliest, so with identical
layers the earlier stages are the lighter ones, where ``uniform`` gives the first ones more).

The client's bottom and top are not stages the strategy moves: they are the family's default
split (``shared.plan.default_split``: 2 layers each end for SmolLM2), unless ``--client-memory``
bounds them, in which case the client keeps as many of those layers as fit (dropping from the
larger end first, at least one each end).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import PARTITION_STRATEGIES
from .errors import UsageError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

STRATEGIES = PARTITION_STRATEGIES
"""``--strategy`` values (spelled in the settings registry)."""
DEFAULT_STRATEGY = "memory"
"""What ``--strategy`` is when unset: devices run out of memory before they run out of time."""
MIXED_MEMORY_WEIGHT = 0.5
"""``mixed``: the weight of a layer's memory share; its compute share gets the rest."""
FLOAT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
"""Bytes a weight of a float precision (and a cache element of that compute dtype) takes."""


class NothingFits(UsageError):
    """A plan whose stages do not fit the memory of their devices (or of ``--client-memory``)."""


# ---- the cost model


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


def _attention_shape(config: PretrainedConfig) -> tuple[int, int, int]:
    """(heads, kv heads, head dim)."""
    h = _int(config, "hidden_size", "n_embd")
    heads = _int(config, "num_attention_heads", "n_head")
    kv = _int(config, "num_key_value_heads", default=heads)
    return heads, kv, _int(config, "head_dim", default=h // heads)


def _matrix_bytes(shape: tuple[int, ...], precision: str, group_size: int, head: bool = False) -> int:
    """Bytes of a matrix at ``precision`` (``int8``/``int4`` as ``shared.models.precision`` packs
    it; the head keeps its own format: ``HEAD_FORMAT_OF``)."""
    from .models.quant.formats import BLOCK, PackedShape, QuantFormat

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

    from .models.gguf_file import read_tensors
    from .models.quant import SUPPORTED_GGUF

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
    from .cache import ROLLBACK_DEPTH
    from .plan import default_split

    if precision not in (*FLOAT_BYTES, "int8", "int4", "gguf"):
        raise UsageError(f"--weights {precision!r} has no cost model: use float32, bfloat16, int8, int4 or gguf")
    if precision == "gguf" and gguf is None:
        raise UsageError(f"--weights gguf keeps a GGUF file's own tensors, but {model or 'this model'} is not a .gguf file")
    n = _int(config, "num_hidden_layers", "n_layer")
    h = _int(config, "hidden_size", "n_embd")
    vocab = _int(config, "vocab_size")
    ctx = max_context or _int(config, "max_position_embeddings", "n_positions", default=8192)
    heads, kv, hd = _attention_shape(config)
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


# ---- devices


@dataclass(frozen=True)
class Device:
    """A device a stage runs on, and the bytes it can hold (None: unknown, not checked)."""

    name: str
    capacity: int | None


def parse_devices(text: str | Sequence[str]) -> list[str]:
    """``cpu,cuda:0,cuda:1`` as a list of device names (each a torch device string).

    Raises:
        UsageError: an empty entry or a device torch does not parse.
    """
    import torch

    items = [x.strip() for x in (text.split(",") if isinstance(text, str) else text)]
    if not items or any(not x for x in items):
        raise UsageError(f"--devices must be device names separated by commas, e.g. cuda:0,cuda:1 or cpu,cpu; got {text!r}")
    for x in items:
        try:
            torch.device(x)
        except RuntimeError:
            raise UsageError(f"--devices: {x!r} is not a device name (cpu, cuda, cuda:N)") from None
    return items


def probe_devices(names: Sequence[str]) -> list[Device]:
    """The devices named, with the memory each can hold; devices that share memory (``cpu``
    named twice) share it equally.

    CPU: psutil's available memory. CUDA: ``torch.cuda.mem_get_info`` (free bytes on that
    device), as torch documents it; untested here (no GPU on the machines this was written on).

    Raises:
        UsageError: a device that does not exist here (``cuda:7`` with fewer GPUs, ``cpu:1``).
    """
    import psutil
    import torch

    free: dict[str, int] = {}
    for name in names:
        d = torch.device(name)
        key = str(d)
        if d.type == "cpu":
            if d.index not in (None, 0):
                raise UsageError(f"device {name}: torch has one CPU device (cpu or cpu:0); name it several times to cut over it, e.g. cpu,cpu")
            free["cpu"] = int(psutil.virtual_memory().available)
        elif d.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            index = 0 if d.index is None else d.index
            if index >= count:
                raise UsageError(f"device {name} does not exist here: torch sees {count} CUDA device(s)")
            free[key] = int(torch.cuda.mem_get_info(index)[0])  # untested here: no GPU
        else:
            raise UsageError(f"device {name}: splitlm runs on cpu and cuda devices")
    shares: dict[str, int] = {}
    for name in names:
        key = "cpu" if torch.device(name).type == "cpu" else str(torch.device(name))
        shares[key] = shares.get(key, 0) + 1
    out = []
    for name in names:
        key = "cpu" if torch.device(name).type == "cpu" else str(torch.device(name))
        out.append(Device(name, free[key] // shares[key]))
    return out


# ---- plans


@dataclass(frozen=True)
class Stage:
    """One stage of a plan: layers ``[start, end)`` on one device.

    Attributes:
        role: ``bottom`` (the client's embedding and first layers), ``trunk`` or ``top``.
        device: the device name, or None when the plan names none (``--stages N``).
        reason: why the cut fell where it did, in words.
    """

    start: int
    end: int
    role: str
    device: str | None
    params: int
    weight_bytes: int
    kv_bytes_per_position: int
    kv_bytes: int
    flops_per_token: int
    reason: str = ""

    @property
    def memory_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [self.start, self.end], "device": self.device, "role": self.role,
            "params": self.params, "weight_bytes": self.weight_bytes,
            "kv_bytes_per_position": self.kv_bytes_per_position, "kv_bytes_at_max_context": self.kv_bytes,
            "memory_bytes": self.memory_bytes, "flops_per_token": self.flops_per_token, "reason": self.reason,
        }


@dataclass(frozen=True)
class Partition:
    """A plan: stages in layer order that tile ``[0, L)``; the bottom and top are the client's."""

    strategy: str
    cost: ModelCost
    stages: tuple[Stage, ...]
    notes: tuple[str, ...] = field(default=())

    @property
    def trunk(self) -> tuple[Stage, ...]:
        return tuple(s for s in self.stages if s.role == "trunk")

    @property
    def split(self) -> tuple[int, int]:
        """The client's cut: the trunk's first and last layer."""
        t = self.trunk
        return (t[0].start, t[-1].end)

    def to_dict(self) -> dict[str, Any]:
        c = self.cost
        return {
            "model": c.model, "model_type": c.model_type, "num_layers": c.num_layers, "strategy": self.strategy,
            "weights": c.precision, "max_context": c.max_context, "split": list(self.split),
            "stages": [s.to_dict() for s in self.stages], "notes": list(self.notes),
        }


def stage_of(cost: ModelCost, start: int, end: int, role: str, device: str | None, reason: str = "") -> Stage:
    """The costs of layers ``[start, end)`` with the ends the role holds."""
    ls = cost.layers[start:end]
    params = sum(x.params for x in ls)
    wb = sum(x.weight_bytes for x in ls)
    flops = sum(x.flops_per_token for x in ls)
    if role == "bottom":
        params, wb = params + cost.embed.params, wb + cost.embed.weight_bytes
    if role == "top":
        params, wb, flops = params + cost.head.params, wb + cost.head.weight_bytes, flops + cost.head.flops_per_token
    return Stage(start, end, role, device, params, wb, sum(x.kv_bytes_per_position for x in ls),
                 sum(x.kv_bytes for x in ls), flops, reason)


def layer_weights(cost: ModelCost, strategy: str, start: int, end: int) -> list[float]:
    """Each trunk layer's cost under ``strategy`` (``uniform``: 1 each)."""
    ls = cost.layers[start:end]
    if strategy == "memory":
        return [float(x.memory_bytes) for x in ls]
    if strategy == "compute":
        return [float(x.flops_per_token) for x in ls]
    if strategy == "mixed":
        mem = sum(x.memory_bytes for x in ls) or 1
        fl = sum(x.flops_per_token for x in ls) or 1
        return [MIXED_MEMORY_WEIGHT * x.memory_bytes / mem + (1 - MIXED_MEMORY_WEIGHT) * x.flops_per_token / fl for x in ls]
    return [1.0] * len(ls)


def balanced_cuts(costs: Sequence[float], shares: Sequence[float]) -> list[int]:
    """Cut ``costs`` into ``len(shares)`` contiguous non-empty groups minimising the largest
    ``group cost / share``; returns the group sizes. Exact (dynamic programming); ties go to the
    earliest cut.

    Raises:
        UsageError: more groups than items.
    """
    n, k = len(costs), len(shares)
    if k > n:
        raise UsageError(f"{k} stages need at least {k} trunk layers; the trunk has {n}")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = math.inf
    # best[j][i]: the smallest largest-stage cost of layers [0, i) in stages [0, j)
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    back = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for j in range(1, k + 1):
        for i in range(j, n - (k - j) + 1):
            for p in range(j - 1, i):
                v = max(best[j - 1][p], (prefix[i] - prefix[p]) / shares[j - 1])
                if v < best[j][i] - 1e-12 * max(1.0, abs(v)):
                    best[j][i], back[j][i] = v, p
    sizes, i = [], n
    for j in range(k, 0, -1):
        p = back[j][i]
        sizes.append(i - p)
        i = p
    return sizes[::-1]


def uniform_cuts(n: int, k: int) -> list[int]:
    """``n`` layers in ``k`` stages of as equal counts as can be, the first ones larger."""
    if k > n:
        raise UsageError(f"{k} stages need at least {k} trunk layers; the trunk has {n}")
    return [n // k + (1 if j < n % k else 0) for j in range(k)]


def parse_layers(text: str, num_layers: int) -> list[tuple[int, int]]:
    """``--layers 2:15,15:28``: the trunk stages of a custom plan, checked to tile a trunk
    range inside ``(0, L)`` (the bottom and the top keep at least one layer each).

    Raises:
        UsageError: malformed text, a gap or an overlap, or a range outside ``0 < a < b < L``.
    """
    ranges = []
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", item)
        if not m:
            raise UsageError(f"--layers must be trunk stages A:B separated by commas, e.g. 2:15,15:28; got {text!r}")
        ranges.append((int(m.group(1)), int(m.group(2))))
    for a, b in ranges:
        if a >= b:
            raise UsageError(f"--layers: stage {a}:{b} is empty (A must be below B)")
    for (a0, b0), (a1, b1) in zip(ranges, ranges[1:]):
        if b0 != a1:
            word = "gap" if b0 < a1 else "overlap"
            raise UsageError(f"--layers: a {word} between {a0}:{b0} and {a1}:{b1}: each stage must start where the one before ends")
    if not 0 < ranges[0][0] or not ranges[-1][1] < num_layers:
        raise UsageError(
            f"--layers {text}: the trunk must lie inside 1..{num_layers - 1} (the client keeps layer 0 and "
            f"layer {num_layers - 1} at least), got {ranges[0][0]}:{ranges[-1][1]}"
        )
    return ranges


def client_split(cost: ModelCost, client_memory: int | None) -> tuple[tuple[int, int], str]:
    """The client's cut ``(a, b)``: the family's default, or with ``client_memory`` as many of
    its layers as fit (bottom ``[0, a)`` and top ``[b, L)`` with their ends), and why.

    Raises:
        NothingFits: not even one layer at each end fits ``client_memory``.
    """
    a, b = cost.default_split
    n = cost.num_layers
    if client_memory is None:
        return (a, b), f"the family's default split {a}:{b}"

    def need(a: int, b: int) -> int:
        bottom, top = stage_of(cost, 0, a, "bottom", None), stage_of(cost, b, n, "top", None)
        return bottom.memory_bytes + top.memory_bytes

    while need(a, b) > client_memory and (a > 1 or b < n - 1):
        if a >= n - b and a > 1:
            a -= 1
        else:
            b += 1
    if need(a, b) > client_memory:
        raise NothingFits(
            f"the client's part does not fit --client-memory {fmt_bytes(client_memory)}: one layer at each end with "
            f"the embedding and head takes {fmt_bytes(need(a, b))} at --max-context {cost.max_context} "
            f"({fmt_bytes(need(a, b) - client_memory)} missing)"
        )
    if (a, b) == cost.default_split:
        return (a, b), f"the family's default split {a}:{b} fits --client-memory {fmt_bytes(client_memory)}"
    return (a, b), (f"--client-memory {fmt_bytes(client_memory)} holds {a} + {n - b} layers "
                    f"({fmt_bytes(need(a, b))}), not the default {cost.default_split[0]}:{cost.default_split[1]}")


def plan(
    cost: ModelCost,
    strategy: str = DEFAULT_STRATEGY,
    stages: int | None = None,
    devices: Sequence[Device] | None = None,
    client_memory: int | None = None,
    layers: str | None = None,
    trunk: tuple[int, int] | None = None,
) -> Partition:
    """A plan of ``cost``'s model: bottom, trunk stages, top.

    Args:
        strategy: one of ``STRATEGIES``.
        stages: trunk stages (the client's bottom and top come extra); default: one per device,
            or 1.
        devices: one per trunk stage, with their capacities (checked: ``NothingFits``).
        client_memory: bounds the client's bottom + top (``client_split``).
        layers: ``custom``'s trunk stages (``parse_layers``).
        trunk: the trunk range to cut (a daemon's ``--split A:B``); default: the client's split.

    Raises:
        UsageError: a bad combination (``custom`` without ``layers``, stages and devices that
            disagree, more stages than layers).
        NothingFits: a device (or the client) cannot hold its stage; the message says how much
            is missing.
    """
    if strategy not in STRATEGIES:
        raise UsageError(f"--strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    n = cost.num_layers
    notes: list[str] = []
    if strategy == "custom":
        if not layers:
            raise UsageError("--strategy custom needs --layers, the trunk stages, e.g. --layers 2:15,15:28")
        ranges = parse_layers(layers, n)
        split = (ranges[0][0], ranges[-1][1])
        if trunk is not None and split != trunk:
            raise UsageError(f"--layers {layers} covers {split[0]}:{split[1]}, not the trunk {trunk[0]}:{trunk[1]}")
        why_client = f"--layers starts the trunk at {split[0]} and ends it at {split[1]}"
    else:
        if layers:
            raise UsageError(f"--layers goes with --strategy custom, not {strategy}")
        if trunk is not None:
            split, why_client = trunk, f"the daemon's --split {trunk[0]}:{trunk[1]}"
        else:
            split, why_client = client_split(cost, client_memory)
        ranges = []
    k = len(ranges) if ranges else (len(devices) if devices else (stages or 1))
    if devices and stages and stages != len(devices):
        raise UsageError(f"--stages {stages} and --devices {','.join(d.name for d in devices)} ({len(devices)}) disagree: give one")
    if devices and len(devices) != k:
        raise UsageError(f"--layers gives {k} trunk stages but --devices names {len(devices)}: one device per stage")
    a, b = split
    if not ranges:
        if strategy == "uniform":
            sizes = uniform_cuts(b - a, k)
        else:
            caps = [d.capacity or 0 for d in devices] if devices else []
            shares = [c / max(caps) for c in caps] if caps and min(caps) > 0 else [1.0] * k
            sizes = balanced_cuts(layer_weights(cost, strategy, a, b), shares)
        ranges, at = [], a
        for s in sizes:
            ranges.append((at, at + s))
            at += s
    out = [stage_of(cost, 0, a, "bottom", "client", f"the client's: {why_client}")]
    trunk_stages = [stage_of(cost, s, e, "trunk", devices[j].name if devices else None) for j, (s, e) in enumerate(ranges)]
    out += _with_reasons(cost, strategy, trunk_stages, devices)
    out.append(stage_of(cost, b, n, "top", "client", f"the client's: {why_client}"))
    _check_fits(out, devices, client_memory)
    return Partition(strategy, cost, tuple(out), (*cost.notes, *notes))


def _with_reasons(cost: ModelCost, strategy: str, stages: list[Stage], devices: Sequence[Device] | None) -> list[Stage]:
    """Each trunk stage with the words saying why it ends where it does."""
    from dataclasses import replace

    k = len(stages)
    total = sum(s.end - s.start for s in stages)
    if strategy == "custom":
        return [replace(s, reason="given by --layers") for s in stages]
    if strategy == "uniform":
        return [replace(s, reason=f"{total} layers / {k} stage(s): {s.end - s.start} here") for s in stages]
    key = {"memory": lambda s: s.memory_bytes, "compute": lambda s: s.flops_per_token}.get(strategy)
    out = []
    if key is not None:
        largest = max(key(s) for s in stages)
        unit = fmt_bytes if strategy == "memory" else fmt_flops
        what = f"weights + KV at {cost.max_context}" if strategy == "memory" else "FLOPs/token"
        for s in stages:
            tag = " (the largest: the cut minimises it)" if key(s) == largest and k > 1 else ""
            share = f" on {s.device}" if devices else ""
            out.append(replace(s, reason=f"{what} {unit(key(s))}{share}{tag}"))
        return out
    mem = sum(s.memory_bytes for s in stages) or 1
    fl = sum(s.flops_per_token for s in stages) or 1
    scores = [MIXED_MEMORY_WEIGHT * s.memory_bytes / mem + (1 - MIXED_MEMORY_WEIGHT) * s.flops_per_token / fl for s in stages]
    for s, sc in zip(stages, scores):
        tag = " (the largest: the cut minimises it)" if sc == max(scores) and k > 1 else ""
        out.append(replace(s, reason=f"{s.memory_bytes / mem:.0%} of trunk memory, {s.flops_per_token / fl:.0%} of "
                                     f"FLOPs: score {sc:.3f}{tag}"))
    return out


def _check_fits(stages: Sequence[Stage], devices: Sequence[Device] | None, client_memory: int | None) -> None:
    """Refuse a plan a device cannot hold: weights + one session's KV at --max-context."""
    problems = []
    if devices:
        for st, d in zip([s for s in stages if s.role == "trunk"], devices):
            if d.capacity is not None and st.memory_bytes > d.capacity:
                problems.append(
                    f"{d.name} holds {fmt_bytes(d.capacity)} but layers {st.start}:{st.end} need "
                    f"{fmt_bytes(st.memory_bytes)} ({fmt_bytes(st.memory_bytes - d.capacity)} missing)"
                )
    if client_memory is not None:
        need = sum(s.memory_bytes for s in stages if s.role != "trunk")
        if need > client_memory:
            problems.append(f"the client's part needs {fmt_bytes(need)} of --client-memory {fmt_bytes(client_memory)} "
                            f"({fmt_bytes(need - client_memory)} missing)")
    if problems:
        total_need = sum(s.memory_bytes for s in stages if s.role == "trunk")
        total_have = sum(d.capacity or 0 for d in devices) if devices else 0
        hint = (f"; all devices together hold {fmt_bytes(total_have)} for {fmt_bytes(total_need)} of trunk"
                if devices else "")
        raise NothingFits("nothing fits: " + "; ".join(problems) + hint +
                          " (a smaller --max-context, --weights int8/int4, or more devices)")


def _short(v: float) -> str:
    """3 significant figures, never in exponent form (``1020``, ``15.9``)."""
    return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.3g}"


def fmt_bytes(n: float) -> str:
    """Bytes in binary units, 3 significant figures (``15.9 MiB``)."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{_short(n / size)} {unit}"
    return f"{int(n)} B"


def fmt_flops(n: float) -> str:
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{_short(n / size)} {unit}"
    return f"{int(n)}"


def fmt_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{_short(n / size)}{unit}"
    return str(int(n))


def render(p: Partition) -> str:
    """``splitlm plan``'s table."""
    c = p.cost
    lines = [
        f"plan: {c.model} ({c.model_type}, {c.num_layers} layers), strategy {p.strategy}, weights {c.precision}, "
        f"--max-context {c.max_context}, split {p.split[0]}:{p.split[1]}",
        f"{'stage':<7}{'layers':>9}  {'device':<9}{'params':>8}{'weights':>11}{'KV/pos':>10}{'KV@ctx':>11}"
        f"{'FLOPs/tok':>11}  why",
    ]
    for s in p.stages:
        lines.append(
            f"{s.role:<7}{f'{s.start}:{s.end}':>9}  {s.device or '-':<9}{fmt_count(s.params):>8}"
            f"{fmt_bytes(s.weight_bytes):>11}{fmt_bytes(s.kv_bytes_per_position):>10}{fmt_bytes(s.kv_bytes):>11}"
            f"{fmt_flops(s.flops_per_token):>11}  {s.reason}"
        )
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)


def config_source(spec: str | None) -> tuple[str, PretrainedConfig, Path | None]:
    """``--model`` for a plan: the model's name, its config and its GGUF file (None for a
    directory). A directory needs only ``config.json`` (no weights: a plan of a 7B model from
    its config alone); anything else resolves as every command resolves ``--model``.

    Raises:
        ModelNotFound: nothing at ``spec``.
    """
    from .models import resolve

    p = Path(spec).expanduser() if spec else None
    if p is not None and p.is_dir() and (p / "config.json").is_file():
        from transformers import AutoConfig

        return spec or "", AutoConfig.from_pretrained(str(p)), None
    source = resolve(spec)
    return source.spec, source.config, source.path if source.kind == "gguf" else None


def partition_for(
    model: str | None,
    strategy: str = DEFAULT_STRATEGY,
    stages: int | None = None,
    devices: str | Sequence[str] | None = None,
    client_memory: int | None = None,
    max_context: int | None = None,
    weights: str | None = None,
    group_size: int = 32,
    layers: str | None = None,
    trunk: tuple[int, int] | None = None,
) -> Partition:
    """A plan from the command line's words (``splitlm plan`` and ``splitlm-trunkd``).

    Raises:
        UsageError, NothingFits, ModelNotFound: see ``plan``, ``probe_devices``, ``config_source``.
    """
    name, config, gguf = config_source(model)
    precision = weights if weights not in (None, "auto") else "float32"
    assert precision is not None
    cost = model_cost(config, name, precision, group_size, max_context, gguf)
    found = probe_devices(parse_devices(devices)) if devices else None
    return plan(cost, strategy, stages, found, client_memory, layers, trunk)
