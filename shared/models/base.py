"""A model family adapter, and a part of a model: a contiguous layer slice with its own cache.

A family adapter knows, for one family of transformers models, the forward recipe in the model's
own order (embed, positions, masks, rotary, layers, norm, head) and which weight names belong to
which part. The modules themselves are transformers' own (``LlamaDecoderLayer``, ``GPT2Block``...),
so a part computes exactly what the same layers compute inside the full model.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from ..cache import PartCache, layer_range, layer_types
from ..errors import ContextExhausted, InvalidStep, PositionError
from .rows import RowsCache, rows_attention_for
from .small_rows import pad_small_products

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from .precision import Precision
    from .quant import QuantLinear
    from .source import ModelSource

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PartSpec:
    """Which pieces of a model a part holds.

    Attributes:
        start, end: the decoder layers ``[start, end)``.
        embed: the part takes token ids and embeds them (the bottom, or the full model).
        head: the part ends with final norm and LM head and returns logits (the top, or full).
    """

    start: int
    end: int
    embed: bool
    head: bool

    @property
    def name(self) -> str:
        if self.embed and self.head:
            return "full"
        return "bottom" if self.embed else "top" if self.head else "trunk"

    @classmethod
    def bottom(cls, start: int) -> PartSpec:
        return cls(0, start, embed=True, head=False)

    @classmethod
    def trunk(cls, start: int, end: int) -> PartSpec:
        return cls(start, end, embed=False, head=False)

    @classmethod
    def top(cls, end: int, num_layers: int) -> PartSpec:
        return cls(end, num_layers, embed=False, head=True)

    @classmethod
    def full(cls, num_layers: int) -> PartSpec:
        return cls(0, num_layers, embed=True, head=True)


class Family(ABC):
    """One family of models: how to run a slice of it, and which weights each part owns."""

    name: ClassVar[str]
    """Short family name shown in plans: ``gpt2``, ``llama``, ``gemma``."""
    model_types: ClassVar[tuple[str, ...]]
    """transformers ``model_type`` values this adapter runs."""
    embed_names: ClassVar[tuple[str, ...]]
    """Weight names of the embedding (and, for GPT-2, position embedding)."""
    layer_prefix: ClassVar[str]
    """Prefix of layer ``i``'s weights, followed by ``f"{i}."``."""
    head_names: ClassVar[tuple[str, ...]]
    """Weight names of the final norm and the LM head."""
    lm_head_name: ClassVar[str] = "lm_head.weight"
    """The LM head weight; tied models take it from the first of ``embed_names``."""

    def owns(self, name: str, spec: PartSpec, tied: bool) -> bool:
        """Whether weight ``name`` belongs to the part ``spec``."""
        if name.startswith(self.layer_prefix):
            idx = int(name[len(self.layer_prefix) :].split(".", 1)[0])
            return spec.start <= idx < spec.end
        if name in self.embed_names:
            return spec.embed or (spec.head and tied and name == self.embed_names[0])
        if name in self.head_names:
            return spec.head and not (tied and name == self.lm_head_name)
        return False

    @abstractmethod
    def embed(self, model: nn.Module, ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Token ids ``(1, t)`` to the hidden states entering layer 0, ``(1, t, H)``."""

    @abstractmethod
    def run_layers(
        self, model: nn.Module, h: torch.Tensor, position_ids: torch.Tensor, cache: PartCache | RowsCache
    ) -> torch.Tensor:
        """Layers ``[cache.start, cache.end)`` over ``h`` ``(1, t, H)``, updating ``cache``; or,
        for a ``RowsCache``, over one position of each row ``(B, 1, H)``, updating each row's cache."""

    @abstractmethod
    def head(self, model: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: ``(1, t, H)`` to logits ``(1, t, V)``."""

    def prepare_state(self, state: dict[str, torch.Tensor]) -> None:
        """Before the parts take their weights: store them as the family's steps read them best
        (the same values, e.g. the Llama family's fused products), replacing entries of ``state``
        (weight name -> tensor). Nothing by default."""
        return None

    def prepare(self, model: nn.Module) -> None:
        """After a part's weights are in place: note what ``prepare_state`` did. Nothing by default."""
        return None


class Part:
    """A contiguous slice of a model, ready to run steps against caches it makes.

    One ``Part`` serves any number of sessions: the weights are shared, each session owns a
    ``PartCache`` from ``new_cache``. Not thread-safe: one thread runs a part's steps at a time.
    """

    def __init__(
        self,
        source: ModelSource,
        family: Family,
        spec: PartSpec,
        model: nn.Module,
        config: PretrainedConfig,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.source = source
        self.family = family
        self.spec = spec
        self.model = model
        self.config = config
        self.dtype = dtype
        self.device = device
        self.hidden_size = int(config.hidden_size)
        self.num_layers = int(config.num_hidden_layers)
        self.layer_types = layer_types(config)

    def new_cache(self) -> PartCache:
        return PartCache(self.config, self.spec.start, self.spec.end)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``InvalidStep`` unless ``x`` is what this part takes."""
        if self.spec.embed:
            if x.dtype != torch.long or x.dim() != 2 or x.shape[0] != 1 or x.shape[1] == 0:
                raise InvalidStep(f"the {self.spec.name} takes token ids of shape (1, t>0), got {tuple(x.shape)}")
            return
        if x.dim() != 3 or x.shape[0] != 1 or x.shape[1] == 0 or x.shape[2] != self.hidden_size:
            raise InvalidStep(
                f"hidden states must have shape (1, t>0, {self.hidden_size}), got {tuple(x.shape)}"
            )

    @torch.inference_mode()
    def forward(
        self,
        x: torch.Tensor,
        position: int,
        cache: PartCache,
        max_context: int | None = None,
        logits_for: int = 1,
    ) -> torch.Tensor:
        """Run positions ``[position, position + t)``; roll ``cache`` back first if needed.

        Args:
            x: token ids ``(1, t)`` for a part with the embedding, else hidden states ``(1, t, H)``.
            position: the first position of ``x``; at most ``cache.length``.
            cache: this session's cache (from ``new_cache``).
            max_context: refuse to grow the cache past this many positions.
            logits_for: a part with the head computes the logits of this many last positions
            (a draft's verification needs every drafted position's; at most ``t``).

        Returns:
            Hidden states ``(1, t, H)``, or for a part with the head the logits of the last
            ``logits_for`` positions, ``(1, logits_for, V)``.

        Raises:
            InvalidStep, PositionError, ContextExhausted: the step does not fit; nothing changed.
        """
        self.begin_step(x, position, cache, max_context)
        t = int(x.shape[1])
        position_ids = torch.arange(position, position + t, device=self.device).unsqueeze(0)  # (1, t)
        if self.spec.embed:
            h = self.family.embed(self.model, x.to(self.device), position_ids)
        else:
            h = x.to(device=self.device, dtype=self.dtype)
        h = self.family.run_layers(self.model, h, position_ids, cache)
        cache.length = position + t
        if self.spec.head:
            n = max(1, min(logits_for, t))
            return self.family.head(self.model, h[:, -n:, :])  # (1, n, V)
        return h

    def run_span(self, h: torch.Tensor, position: int, cache: PartCache, start: int, end: int) -> torch.Tensor:
        """Layers ``[start, end)`` of this trunk part over hidden states ``h`` ``(1, t, H)`` at
        positions ``[position, position + t)``, moved to this part's device and dtype first;
        the cache's other layers and its length are left to the caller (a prefill slice of the
        daemon, one device's share of a ``SpreadPart``). The step must have passed ``begin_step``."""
        t = int(h.shape[1])
        position_ids = torch.arange(position, position + t, device=self.device).unsqueeze(0)  # (1, t)
        h = h.to(device=self.device, dtype=self.dtype)  # (1, t, H)
        with layer_range(cache, start, end) as sub:
            return self.family.run_layers(self.model, h, position_ids, sub)

    def begin_step(self, x: torch.Tensor, position: int, cache: PartCache, max_context: int | None = None) -> None:
        """Check a step against its session and roll ``cache`` back to ``position``.

        Raises:
            InvalidStep, PositionError, ContextExhausted: the step does not fit; nothing changed.
        """
        self.check_input(x)
        t = int(x.shape[1])
        if position > cache.length:
            raise PositionError(
                f"step at position {position} leaves a gap: the session has {cache.length} positions cached"
            )
        if max_context is not None and position + t > max_context:
            raise ContextExhausted(
                f"positions up to {position + t} exceed the context limit of {max_context} tokens per "
                "session (the model's context, or less with the daemon's --max-context)"
            )
        cache.truncate(position)

    @torch.inference_mode()
    def forward_rows(
        self, xs: Sequence[torch.Tensor], positions: Sequence[int], caches: Sequence[PartCache]
    ) -> list[torch.Tensor]:
        """One-position steps of several sessions as one batch (see ``rows``).

        Each step must have passed ``begin_step`` (checked, its cache rolled back to its position).
        Row ``b`` computes what ``forward(xs[b], positions[b], caches[b])`` computes, to float
        rounding: the linear layers run once over all rows, attention row by row in each cache.

        Returns:
            Per row, what ``forward`` returns: ``(1, 1, H)``, or ``(1, 1, V)`` for a part with the head.

        Raises:
            InvalidStep: a step is not one position long. On any error the caches may hold a
            partial step: the caller rolls each back to its position.
        """
        if any(x.shape[1] != 1 for x in xs):
            raise InvalidStep("a batch runs one-position steps only")
        position_ids = torch.tensor([[p] for p in positions], device=self.device)  # (B, 1)
        if self.spec.embed:
            ids = torch.cat([x.to(self.device) for x in xs], dim=0)  # (B, 1)
            h = self.family.embed(self.model, ids, position_ids)
        else:
            h = torch.cat([x.to(device=self.device, dtype=self.dtype) for x in xs], dim=0)  # (B, 1, H)
        with rows_attention_for(self.model) as own:
            h = self.family.run_layers(self.model, h, position_ids, RowsCache(caches, own))
        for position, cache in zip(positions, caches):
            cache.length = position + 1
        if self.spec.head:
            h = self.family.head(self.model, h)  # (B, 1, V)
        return list(torch.split(h, 1, dim=0))  # B x (1, 1, V); torch.split is typed, Tensor.split not


class ChainCache:
    """The caches of a ``PartChain``, one per part."""

    def __init__(self, caches: list[PartCache]) -> None:
        self.caches = caches

    @property
    def length(self) -> int:
        return self.caches[-1].length

    @property
    def rollback_floor(self) -> int:
        return max(c.rollback_floor for c in self.caches)


class PartChain:
    """Parts that follow each other, run one after another here as one model.

    The full model at a per-part precision (a client's int4 bottom and top around a float32
    trunk): each part computes what it computes in the split, and the hidden states between two
    parts go from one's dtype to the next's as they do over the wire (a part casts its input to
    its own dtype), so the chain equals the split step for step. ``LocalPipeline`` runs it like
    a single full ``Part``.
    """

    def __init__(self, parts: Sequence[Part]) -> None:
        if not parts or not parts[0].spec.embed or not parts[-1].spec.head:
            raise ValueError("a chain runs from the embedding to the head")
        for a, b in zip(parts, parts[1:]):
            if a.spec.end != b.spec.start:
                raise ValueError(f"the {a.spec.name} ends at layer {a.spec.end}, the {b.spec.name} starts at {b.spec.start}")
        self.parts = list(parts)
        self.spec = PartSpec(0, parts[-1].spec.end, embed=True, head=True)
        self.dtype = parts[-1].dtype
        self.device = parts[-1].device

    def new_cache(self) -> ChainCache:
        return ChainCache([p.new_cache() for p in self.parts])

    def forward(
        self, x: torch.Tensor, position: int, cache: ChainCache, max_context: int | None = None, logits_for: int = 1
    ) -> torch.Tensor:
        """``Part.forward`` through every part: token ids in, the last ``logits_for`` logits out."""
        for part, c in zip(self.parts[:-1], cache.caches):
            x = part.forward(x, position, c, max_context)
        return self.parts[-1].forward(x, position, cache.caches[-1], max_context, logits_for)


def submodule(model: nn.Module, path: str) -> nn.Module:
    """``model``'s submodule at the dotted ``path`` (``"model.layers.3"``), typed as a Module.

    ``nn.Module.__getattr__`` is typed ``Tensor | Module``, so ``model.model.norm(h)`` is not a
    call mypy accepts; ``get_submodule`` walks the same attributes (``AttributeError`` when one is
    missing) and is typed to return a Module.
    """
    return model.get_submodule(path)


def resolve_device(device: str) -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        from ..errors import UsageError

        raise UsageError(f"--device {device}: no CUDA device is available here (torch sees none)")
    return d


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is float32 on the CPU, bfloat16 on a GPU that has it, else float16."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        from ..errors import UsageError

        raise UsageError(f"--dtype must be one of auto, {', '.join(table)}; got {dtype!r}")
    return table[dtype]


def build_part(
    source: ModelSource,
    family: Family,
    spec: PartSpec,
    dtype: torch.dtype,
    device: torch.device,
    precision: Precision | None = None,
) -> Part:
    """One part; see ``build_parts``."""
    return build_parts(source, family, [spec], dtype, device, precision)[0]


WEIGHT_ALIGNMENT = 64
"""Bytes every weight's data starts on (what torch's CPU allocator gives a new tensor)."""


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t``, copied when its data does not start on ``WEIGHT_ALIGNMENT`` bytes.

    MKL's one-row product (every decode step's linear layers on a CPU) rounds differently when the
    weight starts off a 16-byte boundary, and a memory-mapped safetensors tensor (the GGUF cache)
    starts wherever the file put it (8 bytes past one for SmolLM2). A process that loaded a layer
    from the map and one that got it from a fresh allocation then computed different last bits
    for the same step: the full model here and the daemon's trunk were not bit-identical on
    decode steps. Aligned copies give every process the same kernel path.
    """
    if t.device.type == "cpu" and t.numel() and t.data_ptr() % WEIGHT_ALIGNMENT:
        return t.clone(memory_format=torch.contiguous_format)
    return t


def build_parts(
    source: ModelSource,
    family: Family,
    specs: list[PartSpec],
    dtype: torch.dtype,
    device: torch.device,
    precision: Precision | None = None,
) -> list[Part]:
    """Build parts of one model, materialising only the weights they own, each read once.

    Each part's model is built on the ``meta`` device (buffers such as rotary frequencies are
    computed for real); then the union of the parts' tensors is read in one pass (a GGUF tensor
    is dequantised only when some part owns it) and each part is assigned its own. Parts built
    together share tensors: a client's bottom and top hold one embedding matrix between them when
    the head is tied to it.

    With a quantised ``precision`` (``dtype`` must be its dtype) the parts come quantised
    (``shared.models.quantize``): ``int8``/``int4`` quantise the float weights as they load;
    ``gguf`` reads the file's blocks as they are and never makes float copies of them.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    config = source.config
    tied = bool(getattr(config, "tie_word_embeddings", False))
    skeletons, wanted_by = [], []
    for spec in specs:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config)
        model.eval()
        names = set(model.state_dict().keys())
        wanted = {n for n in names if family.owns(n, spec, tied)}
        if spec.head and family.lm_head_name not in wanted:
            wanted.add(family.embed_names[0])  # tied head: the embedding matrix is the head
        skeletons.append(model)
        wanted_by.append(wanted)
    union = set().union(*wanted_by)
    state: dict[str, torch.Tensor] = {}
    blocks: dict[str, QuantLinear] = {}
    if precision is not None and precision.weights == "gguf":
        from .quant import QuantLinear

        for name, item in source.iter_blocks(lambda n: n in union, skeletons[0], dtype):
            if isinstance(item, torch.Tensor):
                state[name] = aligned(item.to(device))
            else:
                out_features, in_features = _weight_shape(skeletons[0], name)
                blocks[name] = QuantLinear.from_blocks(item.data, item.fmt, out_features, in_features)
    else:
        quantizing = precision is not None and precision.quantized
        for name, tensor in source.iter_tensors(lambda n: n in union, skeletons[0], dtype):
            # quantising: own copies, so no view keeps the memory-mapped file's pages resident
            # once the float weights are gone
            state[name] = tensor.to(device).clone() if quantizing else aligned(tensor.to(device))
    if precision is None or not precision.quantized:
        family.prepare_state(state)  # before any part takes a tensor: parts built together share them
    ntensors = len(state) + len(blocks)
    nbytes = sum(t.numel() * t.element_size() for t in state.values()) + sum(q.nbytes for q in blocks.values())
    parts = []
    for spec, model, wanted in zip(specs, skeletons, wanted_by):
        own = {n: state[n] for n in wanted if n in state}
        head_tied = spec.head and family.lm_head_name not in own
        missing = wanted - own.keys() - blocks.keys() - ({family.lm_head_name} if head_tied else set())
        if missing:
            raise ValueError(f"{source.spec}: weights missing for the {spec.name}: {sorted(missing)[:5]}")
        model.load_state_dict(own, strict=False, assign=True)
        if head_tied:
            model.get_output_embeddings().weight = model.get_input_embeddings().weight
        if device.type == "cpu" and dtype == torch.float32:
            pad_small_products(model)  # 2- and 3-row products cost more than 4 under MKL
        family.prepare(model)
        for buf_name, buf in list(model.named_buffers()):
            if buf.device != device and buf.device.type != "meta":
                module_name, _, attr = buf_name.rpartition(".")
                module = model.get_submodule(module_name) if module_name else model
                module._buffers[attr] = buf.to(device)
        parts.append(Part(source, family, spec, model, config, dtype, device))
    if precision is not None and precision.quantized:
        from .precision import FORMAT_OF, HEAD_FORMAT_OF
        from .quantize import quantize_parts

        counts = quantize_parts(
            parts, FORMAT_OF.get(precision.weights), precision.group_size, blocks, HEAD_FORMAT_OF.get(precision.weights)
        )
        for part, n in zip(parts, counts):
            log.info("%s [%d, %d): %d products in %s", part.spec.name, part.spec.start, part.spec.end, n, precision.tag)
        state.clear()  # the float weights that were quantised go now, not when this returns
        own = {}

    log.info(
        "loaded %s of %s: %d tensors, %.1f MiB, %s on %s, %.2f s",
        "+".join(f"{s.name} [{s.start}, {s.end})" for s in specs), source.spec, ntensors,
        nbytes / 2**20, str(dtype).removeprefix("torch."), device, time.perf_counter() - t0,
    )
    if precision is not None and precision.quantized:
        release_freed_memory()
    return parts


def release_freed_memory() -> None:
    """Hand memory freed on the heap back to the system (glibc's ``malloc_trim``; elsewhere a
    no-op). Quantising frees the float weights it read, ~4-8x what it keeps, but glibc keeps
    freed heap pages in the process: without this a part quantised to int4 stayed as resident
    as the float32 one (SmolLM2's full model: 1010 MiB before, 481 after)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = getattr(libc, "malloc_trim", None)
    except OSError:
        return
    if trim is not None:
        trim(0)


def _weight_shape(skeleton: nn.Module, name: str) -> tuple[int, int]:
    """``(out_features, in_features)`` of a matrix of the skeleton (a linear's weight, or an
    embedding's ``(vocab, hidden)``: one row of blocks per token)."""
    shape = tuple(skeleton.get_parameter(name).shape)
    if len(shape) != 2:
        raise ValueError(f"{name} has shape {shape}: only matrices are kept quantised")
    return int(shape[0]), int(shape[1])
