"""The bandwidth floor of a decode step: bytes read per token ÷ the memory bandwidth measured here.

A decode step of one position multiplies one row by every weight matrix the part owns, so on a
CPU it streams each weight from memory once: no implementation can decode faster than the bytes
it reads over the bandwidth the machine sustains. Issue 13 states its decode goal as a multiple of
that floor (≤ 1.3×), so the bench reports each decode figure that way.

- ``decode_bytes``: the bytes one decode step reads, counted from the loaded modules' tensors at
  their precision (``element_size × numel``; a quantized tensor subclass counts its inner tensors;
  a module with an ``nbytes`` attribute, such as a quantized linear layer that packs its weights,
  is taken at its word). Every weight of the decoder layers, the final norm and the LM head once;
  the embedding contributes one row (the step looks up one token), not its matrix. The KV cache
  adds ``kv_per_position`` bytes per cached position (reported apart: small next to the weights
  at the bench's contexts, and not what the issue's floor counts).
- ``probe_bandwidth``: torch at the bench's thread count, two ways: the sum of a 1 GiB buffer,
  and a stream of 576 × 1536 matrix-vector products over more matrices than any cache holds
  (SmolLM2's MLP shape, the kernel a decode step runs). The floor uses the faster of the two: a
  floor is a lower bound on time.

Who calls: ``run`` on the main thread, after the parts are loaded and before the timed runs.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypedDict

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ...shared.models import Part, PartSpec

log = logging.getLogger(__name__)

NAN = float("nan")

READ_BYTES = 1 << 30
"""The summed buffer: 1 GiB, far past the last-level cache, as in the issue's measurement."""
MATVEC_SHAPE = (1536, 576)
"""One matrix of the matrix-vector stream, (out, in): SmolLM2's MLP up/gate projection."""
MATVEC_BYTES = 256 << 20
"""The stream's matrices together: enough that each product reads its matrix from memory."""


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor's storage holds for its elements: ``element_size × numel``, or the sum of
    the inner tensors of a tensor subclass (torchao's ``Int8Tensor`` reports its logical float
    dtype; its int8 data and scales are what a step reads). Meta tensors (weights a part does not
    own) hold nothing."""
    if t.device.type == "meta":
        return 0
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is not None:
        names, _ = flatten()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return int(t.numel()) * int(t.element_size())


def module_bytes(module: nn.Module) -> int:
    """The weight bytes of ``module`` and its children: its ``nbytes`` when it declares one (a
    quantized layer packing its weights its own way), else its parameters and persistent buffers,
    then its children's."""
    declared = getattr(module, "nbytes", None)
    if isinstance(declared, int):
        return declared
    total = sum(tensor_bytes(p) for p in module.parameters(recurse=False))
    skip: set[str] = getattr(module, "_non_persistent_buffers_set", set())
    total += sum(tensor_bytes(b) for n, b in module.named_buffers(recurse=False) if n not in skip)
    return total + sum(module_bytes(c) for c in module.children())


@dataclass(frozen=True)
class DecodeBytes:
    """Bytes one decode step of a part reads.

    Attributes:
        layers: the decoder layers' weights (every linear and norm).
        embed: one row of each embedding table (token, and GPT-2's position).
        head: the final norm and the LM head.
        kv_per_position: KV cache bytes per cached position, over the part's layers.
    """

    layers: int
    embed: int
    head: int
    kv_per_position: int

    @property
    def weights(self) -> int:
        """What the floor counts: every weight read once."""
        return self.layers + self.embed + self.head

    def __add__(self, other: DecodeBytes) -> DecodeBytes:
        return DecodeBytes(self.layers + other.layers, self.embed + other.embed, self.head + other.head,
                           self.kv_per_position + other.kv_per_position)


def _module_of(model: nn.Module, weight_name: str) -> nn.Module | None:
    path = weight_name.rpartition(".")[0]
    try:
        return model.get_submodule(path) if path else model
    except AttributeError:
        return None


def _embed_row_bytes(module: nn.Module) -> int:
    weight = getattr(module, "weight", None)
    rows = getattr(module, "num_embeddings", None) or (int(weight.shape[0]) if weight is not None else 0)
    return module_bytes(module) // rows if rows else 0


def kv_bytes_per_position(part: Part, layers: int) -> int:
    """KV cache bytes per position over ``layers`` layers in the part's dtype (keys and values);
    sliding-window layers are counted as full ones (an upper bound past their window)."""
    import torch

    cfg = part.config
    heads = int(getattr(cfg, "num_attention_heads", 0) or 0)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or (part.hidden_size // heads if heads else 0))
    return 2 * layers * kv_heads * head_dim * torch.empty((), dtype=part.dtype).element_size()


def decode_bytes(part: Part, spec: PartSpec | None = None) -> DecodeBytes:
    """Bytes one decode step of ``spec`` (default: the part's own) reads, counted from ``part``'s
    loaded tensors: ``spec`` must lie within the part (the trunk of a full model, for the daemon's
    share at the same precision without loading it here).

    Raises:
        ValueError: ``spec`` reaches outside the part.
    """
    from ...shared.models.precision import decoder_layers

    spec = spec or part.spec
    own = part.spec
    if spec.start < own.start or spec.end > own.end or (spec.embed and not own.embed) or (spec.head and not own.head):
        raise ValueError(f"{spec.name} [{spec.start}, {spec.end}) is not within the {own.name} [{own.start}, {own.end})")
    model, family = part.model, part.family
    blocks = decoder_layers(model)
    layers = sum(module_bytes(blocks[i]) for i in range(spec.start, spec.end))
    embed = 0
    if spec.embed:
        for name in family.embed_names:
            m = _module_of(model, name)
            embed += _embed_row_bytes(m) if m is not None else 0
    head = 0
    if spec.head:
        seen: set[int] = set()
        modules = [_module_of(model, n) for n in family.head_names if n != family.lm_head_name]
        get_head = getattr(model, "get_output_embeddings", None)
        if callable(get_head):
            modules.append(get_head())
        for m in modules:
            if m is not None and id(m) not in seen:
                seen.add(id(m))
                head += module_bytes(m)
    return DecodeBytes(layers, embed, head, kv_bytes_per_position(part, spec.end - spec.start))


class Bandwidth(TypedDict):
    """The probe's figures (bytes/s) and how they were taken."""

    read_bytes_per_s: float
    matvec_bytes_per_s: float
    bytes_per_s: float
    threads: int
    read_bytes: int
    matvec_bytes: int
    matvec_shape: list[int]


def probe_bandwidth(
    read_bytes: int = READ_BYTES, matvec_bytes: int = MATVEC_BYTES, repeats: int = 5
) -> Bandwidth:
    """Memory bandwidth as torch sees it at its current thread count: the median of ``repeats``
    sums of a ``read_bytes`` float32 buffer, and of ``repeats`` passes of one-row products over
    ``matvec_bytes`` of 576 × 1536 float32 matrices (each pass reads every matrix once). The
    buffers are freed before returning."""
    import torch

    threads = torch.get_num_threads()
    with torch.inference_mode():
        buf = torch.ones(max(1, read_bytes // 4), dtype=torch.float32)
        buf.sum()  # first touch and warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            buf.sum()
            times.append(time.perf_counter() - t0)
        read = buf.numel() * 4 / statistics.median(times)
        del buf
        out_f, in_f = MATVEC_SHAPE
        count = max(1, matvec_bytes // (out_f * in_f * 4))
        mv = _matvec_stream(torch.randn(count, out_f, in_f, dtype=torch.float32), repeats)
    log.info("bandwidth at %d thread(s): %.1f GB/s summing %d MiB, %.1f GB/s in one-row products",
             threads, read / 1e9, read_bytes >> 20, mv / 1e9)
    return Bandwidth(read_bytes_per_s=read, matvec_bytes_per_s=mv, bytes_per_s=max(read, mv), threads=threads,
                     read_bytes=read_bytes, matvec_bytes=count * out_f * in_f * 4, matvec_shape=[out_f, in_f])


def _matvec_stream(mats: torch.Tensor, repeats: int) -> float:
    """Bytes/s of one-row products over every matrix of ``mats`` ``(count, out, in)`` in turn
    (median of ``repeats`` passes after one unrecorded pass)."""
    import torch

    x = torch.randn(1, mats.shape[2], dtype=mats.dtype)
    linear = torch.nn.functional.linear

    def one_pass() -> float:
        t0 = time.perf_counter()
        for i in range(mats.shape[0]):
            linear(x, mats[i])
        return time.perf_counter() - t0

    one_pass()
    return mats.numel() * mats.element_size() / statistics.median([one_pass() for _ in range(repeats)])


class PartBytes(TypedDict):
    """One part's bytes per decoded token (weights: what the floor counts)."""

    weights: int
    layers: int
    embed: int
    head: int
    kv_per_position: int


class FloorSummary(TypedDict):
    """``summary.floor``: the probe, bytes per token per part, each part's floor (seconds) and the
    measured decode figures over it (``full_decode``, ``split_decode``: per-token p50 over the
    whole model's floor; ``client_part``: the split's client compute per token over the client's
    floor; ``trunk_part``: the daemon's compute over the trunk's)."""

    bandwidth: Bandwidth
    bytes_per_token: dict[str, PartBytes]
    floor_s: dict[str, float]
    over_floor: dict[str, float]


def part_bytes(b: DecodeBytes) -> PartBytes:
    return PartBytes(weights=b.weights, layers=b.layers, embed=b.embed, head=b.head,
                     kv_per_position=b.kv_per_position)


def split_bytes(full: Part, start: int, end: int) -> dict[str, DecodeBytes]:
    """Bytes per token of the full model and of each part of the split ``[start, end)``, all
    counted from the full model's tensors (the same precision as the parts: the bench loads them
    together)."""
    from ...shared.models import PartSpec

    n = full.num_layers
    bottom = decode_bytes(full, PartSpec.bottom(start))
    top = decode_bytes(full, PartSpec.top(end, n))
    return {"full": decode_bytes(full), "client": bottom + top, "trunk": decode_bytes(full, PartSpec.trunk(start, end))}


def summarise(
    bandwidth: Bandwidth, parts: dict[str, DecodeBytes], measured: dict[str, tuple[str, float]]
) -> FloorSummary:
    """The floor of each part and each measured figure over its floor.

    Args:
        bandwidth: the probe's result.
        parts: bytes per token by part name (``full``, ``client``, ``trunk``).
        measured: figure name → (part whose floor it is measured against, seconds per token).
    """
    bw = bandwidth["bytes_per_s"]
    floor_s = {name: b.weights / bw if bw > 0 else NAN for name, b in parts.items()}
    over = {k: (s / floor_s[p] if floor_s.get(p) and s == s else NAN) for k, (p, s) in measured.items()}
    return FloorSummary(bandwidth=bandwidth, bytes_per_token={k: part_bytes(v) for k, v in parts.items()},
                        floor_s=floor_s, over_floor=over)


def table_rows(floor: FloorSummary | None) -> list[tuple[str, str, str, str]]:
    """Rows for the bench's table (``figure, full, split, split/full``): the probe, the bytes and
    each decode figure as a multiple of its floor."""
    if not floor:
        return []

    def f(x: float | None, digits: int = 2) -> str:
        return "—" if x is None or x != x else f"{x:.{digits}f}"

    bw, b, fl, o = floor["bandwidth"], floor["bytes_per_token"], floor["floor_s"], floor["over_floor"]
    mb = 1e-6
    rows = [
        (f"memory bandwidth (GB/s, {bw['threads']} thread(s)): sum {bw['read_bytes'] >> 20} MiB / one-row products",
         f(bw["read_bytes_per_s"] / 1e9, 1), f(bw["matvec_bytes_per_s"] / 1e9, 1), "—"),
        ("weight bytes read per token (MB): full / client + trunk",
         f(b["full"]["weights"] * mb, 1),
         f"{f(b['client']['weights'] * mb, 1)} + {f(b['trunk']['weights'] * mb, 1)}", "—"),
        ("bandwidth floor per token (ms): full / client + trunk", f(fl["full"] * 1e3),
         f"{f(fl['client'] * 1e3)} + {f(fl['trunk'] * 1e3)}", "—"),
        ("decode ms/token p50 / floor (full, split)", f(o.get("full_decode")), f(o.get("split_decode")), "—"),
        ("client part ms/token / client floor", "—", f(o.get("client_part")), "—"),
        ("trunk compute ms/token / trunk floor", "—", f(o.get("trunk_part")), "—"),
        ("KV cache bytes per cached position (KB): full / client + trunk", f(b["full"]["kv_per_position"] / 1e3, 1),
         f"{f(b['client']['kv_per_position'] / 1e3, 1)} + {f(b['trunk']['kv_per_position'] / 1e3, 1)}", "—"),
    ]
    return rows
