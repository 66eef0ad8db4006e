"""The Llama family: Llama, Mistral, Qwen2, SmolLM2 (rotary positions, grouped-query attention,
RMSNorm; Mistral and Qwen2 may use sliding-window layers, kept per layer index).

A lean layer step. transformers' ``LlamaDecoderLayer`` (and Mistral's and Qwen2's, the same code)
wraps its arithmetic in two ``deprecate_kwarg`` wrappers, the gradient-checkpointing ``__call__``,
keyword plumbing, the attention registry and an ``nn.Module.__call__`` for each of its eleven
submodules, and ``SmallRowsLinear`` counts rows before every one-row product. On SmolLM2 (1 thread,
context 16, CPU ms per decode step, ``scripts/decode_floor.py``) the bare products cost 51.4, the
model with the layer modules 69.5, with ``lean_layer`` 62.7. ``lean_layer`` runs the same
operations, in the same order, on the same submodules' weights, without the wrappers: the same
bits (tests compare it with the layer modules on every Llama-family model, and generation with
transformers' own).

It dispatches on each submodule's exact type, so a module swapped in (a quantized linear layer, a
norm of another kind) is still called as a module; only the types whose ``forward`` is written out
here are inlined.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 - torch's own spelling
from transformers.activations import SiLUActivation
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaMLP,
    LlamaRMSNorm,
)
from transformers.models.mistral.modeling_mistral import (
    MistralAttention,
    MistralDecoderLayer,
    MistralMLP,
    MistralRMSNorm,
)
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2Attention,
    Qwen2DecoderLayer,
    Qwen2MLP,
    Qwen2RMSNorm,
)

from ..cache import PartCache
from .base import WEIGHT_ALIGNMENT
from .decoder import RotaryDecoderFamily, StepInputs
from .rows import RowsCache
from .small_rows import SmallRowsLinear

LEAN_LAYERS: tuple[type[nn.Module], ...] = (LlamaDecoderLayer, MistralDecoderLayer, Qwen2DecoderLayer)
"""Decoder layers whose ``forward`` is ``lean_layer``'s (transformers generates the three from one source)."""
_ATTENTIONS = (LlamaAttention, MistralAttention, Qwen2Attention)
_MLPS = (LlamaMLP, MistralMLP, Qwen2MLP)
_NORMS = (LlamaRMSNorm, MistralRMSNorm, Qwen2RMSNorm)
_PLAIN_LINEARS = (nn.Linear, SmallRowsLinear)
"""Linear modules whose one-row ``forward`` is exactly ``F.linear(x, weight, bias)``."""
FUSED = "splitlm_fused"
"""Attribute of an attention (q, k, v) or MLP (gate, up) module holding its ``FusedWeights``."""


@dataclass(frozen=True)
class FusedWeights:
    """Linear layers of one input whose weights are consecutive rows of one matrix.

    q, k and v (and gate and up) read the same input; as one product of a ``(q + k + v, H)``
    matrix they cost one kernel call, and at 2 threads one wake-up of the second thread, instead
    of three (SmolLM2's products, 2 threads, a loaded machine: 47.0 -> 42.7 ms per step). MKL's
    one-row product computes each output row on its own, so the rows come out bit for bit as the
    separate products give them (checked at 1, 2, 5 and 20 rows, 1 and 2 threads, and by the lean
    layer tests); the fused product is used for one-row products only, where that was checked.
    The modules keep their own weights, as views of the one matrix (no second copy; parts built
    together share it, as they share every tensor).

    Attributes:
        weights: the modules' weights as fused (weak: a module whose weight was replaced since,
            by quantization or a swapped-in module, no longer matches, and the matrix is not kept
            alive for it).
        splits: rows of each.
        cols: the input width.
    """

    weights: tuple[weakref.ReferenceType[torch.Tensor], ...]
    splits: tuple[int, ...]
    cols: int

    def matrix(self, modules: Sequence[Any]) -> torch.Tensor | None:
        """The fused matrix ``(sum(splits), cols)``, or None when a module's weight is no longer
        the view it got. Only without autograd (the view spans several parameters)."""
        for ref, module in zip(self.weights, modules):
            if getattr(module, "weight", None) is not ref():
                return None
        first: torch.Tensor = modules[0].weight
        return first.as_strided((sum(self.splits), self.cols), (self.cols, 1))


def fuse_rows(state: dict[str, torch.Tensor], names: Sequence[str]) -> None:
    """Replace ``state[name]`` for ``names`` (float32 CPU matrices of one width) by views of one
    matrix, their rows in order; nothing changes unless all are there, such, and each view
    starts on ``WEIGHT_ALIGNMENT`` bytes."""
    ws = [state.get(n) for n in names]
    first = ws[0]
    if first is None or first.dim() != 2:
        return
    cols = int(first.shape[1])
    offset = 0
    for w in ws:
        if w is None or w.dtype != torch.float32 or w.device.type != "cpu" or w.dim() != 2 or w.shape[1] != cols:
            return
        if offset * cols * 4 % WEIGHT_ALIGNMENT:
            return
        offset += int(w.shape[0])
    weights = [w for w in ws if w is not None]
    matrix = torch.cat(weights)  # (sum of rows, cols)
    for name, view in zip(names, torch.split(matrix, [int(w.shape[0]) for w in weights])):
        state[name] = view


def adopt(modules: Sequence[Any]) -> FusedWeights | None:
    """The ``FusedWeights`` of ``modules`` when ``fuse_rows`` made their weights consecutive rows
    of one matrix and they are plain bias-free linear layers; else None."""
    if any(type(m) not in _PLAIN_LINEARS or m.bias is not None for m in modules):
        return None
    ws: list[torch.Tensor] = [m.weight for m in modules]
    if any(w.device.type != "cpu" or w.dtype != torch.float32 or not w.is_contiguous() for w in ws):
        return None
    for a, b in zip(ws, ws[1:]):
        if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
            return None
        if a.data_ptr() + a.numel() * a.element_size() != b.data_ptr() or a.shape[1] != b.shape[1]:
            return None
    return FusedWeights(tuple(weakref.ref(w) for w in ws), tuple(int(w.shape[0]) for w in ws), int(ws[0].shape[1]))


class LlamaFamily(RotaryDecoderFamily):
    name: ClassVar[str] = "llama"
    model_types: ClassVar[tuple[str, ...]] = ("llama", "mistral", "qwen2")

    def prepare_state(self, state: dict[str, torch.Tensor]) -> None:
        """q/k/v and gate/up of each layer as rows of one matrix (see ``FusedWeights``); bias-free
        layers only (a fused product with biases was not checked bit for bit)."""
        for name in list(state):
            if name.endswith(".self_attn.q_proj.weight"):
                base = name.removesuffix("q_proj.weight")
                if not any(f"{base}{p}_proj.bias" in state for p in "qkv"):
                    fuse_rows(state, [f"{base}{p}_proj.weight" for p in "qkv"])
            elif name.endswith(".mlp.gate_proj.weight"):
                base = name.removesuffix("gate_proj.weight")
                if f"{base}gate_proj.bias" not in state and f"{base}up_proj.bias" not in state:
                    fuse_rows(state, [f"{base}gate_proj.weight", f"{base}up_proj.weight"])

    def prepare(self, model: nn.Module) -> None:
        """Note the fused products of each layer this part holds (``adopt``)."""
        layers: Any = model.get_submodule("model.layers")
        for layer in layers:
            if type(layer) not in LEAN_LAYERS:
                continue
            attn, mlp = layer.self_attn, layer.mlp
            if type(attn) in _ATTENTIONS:
                setattr(attn, FUSED, adopt((attn.q_proj, attn.k_proj, attn.v_proj)))
            if type(mlp) in _MLPS:
                setattr(mlp, FUSED, adopt((mlp.gate_proj, mlp.up_proj)))

    def run_layer(
        self, layer: nn.Module, h: torch.Tensor, step: StepInputs, cache: PartCache | RowsCache
    ) -> torch.Tensor:
        if step.lean and isinstance(cache, PartCache) and type(layer) in LEAN_LAYERS:
            return lean_layer(layer, h, step, cache)
        return super().run_layer(layer, h, step, cache)


def lean_layer(layer: Any, h: torch.Tensor, step: StepInputs, cache: PartCache) -> torch.Tensor:
    """``LlamaDecoderLayer.forward`` (with sdpa attention) over ``h`` ``(B, t, H)``, op for op.

    The modules are ``Any`` here: their submodules and weights are dynamic attributes (typed
    ``Tensor | Module`` by ``nn.Module``), and their exact types are checked before use.
    """
    residual = h
    h = _norm(layer.input_layernorm, h)
    h = residual + _attention(layer.self_attn, h, step, cache)
    residual = h
    h = _norm(layer.post_attention_layernorm, h)
    return residual + _mlp(layer.mlp, h, step.one_row, step.fusable)


def _linear(module: Any, x: torch.Tensor, one_row: bool) -> torch.Tensor:
    if one_row and type(module) in _PLAIN_LINEARS:
        return F.linear(x, module.weight, module.bias)
    out: torch.Tensor = module(x)
    return out


def _norm(norm: Any, h: torch.Tensor) -> torch.Tensor:
    """``LlamaRMSNorm.forward`` (its two ``.to`` are the identity for float32: skipped)."""
    out: torch.Tensor
    if type(norm) not in _NORMS:
        out = norm(h)
        return out
    dtype = h.dtype
    x = h if dtype == torch.float32 else h.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)  # (B, t, 1)
    x = x * torch.rsqrt(variance + norm.variance_epsilon)
    out = norm.weight * (x if dtype == torch.float32 else x.to(dtype))
    return out


def _mlp(mlp: Any, x: torch.Tensor, one_row: bool, fusable: bool) -> torch.Tensor:
    """``LlamaMLP.forward``: ``down(act(gate(x)) * up(x))``."""
    if type(mlp) not in _MLPS:
        out: torch.Tensor = mlp(x)
        return out
    fused: FusedWeights | None = getattr(mlp, FUSED, None) if one_row and fusable else None
    w = fused.matrix((mlp.gate_proj, mlp.up_proj)) if fused is not None else None
    if fused is not None and w is not None:
        gate_up = F.linear(x, w)  # (1, 1, 2 * I)
        gate, up = gate_up[..., : fused.splits[0]], gate_up[..., fused.splits[0] :]
    else:
        gate, up = _linear(mlp.gate_proj, x, one_row), None
    act = F.silu(gate) if type(mlp.act_fn) is SiLUActivation else mlp.act_fn(gate)
    if up is None:
        up = _linear(mlp.up_proj, x, one_row)
    return _linear(mlp.down_proj, act * up, one_row)


def _attention(attn: Any, x: torch.Tensor, step: StepInputs, cache: PartCache) -> torch.Tensor:
    """``LlamaAttention.forward`` with transformers' ``sdpa_attention_forward``."""
    if type(attn) not in _ATTENTIONS:
        res: tuple[torch.Tensor, Any] = attn(
            hidden_states=x, attention_mask=step.mask, position_ids=step.position_ids, cache=cache,
            use_cache=True, position_embeddings=step.rope,
        )
        return res[0]
    one_row = step.one_row
    mask = step.mask
    if isinstance(mask, list):
        raise TypeError("lean layers run a solo cache's step, not a batch of rows")
    input_shape = x.shape[:-1]  # (B, t)
    hd: int = attn.head_dim
    cos, sin = step.rope_heads  # (B, 1, t, hd): unsqueezed once per step
    fused: FusedWeights | None = getattr(attn, FUSED, None) if one_row and step.fusable else None
    w = fused.matrix((attn.q_proj, attn.k_proj, attn.v_proj)) if fused is not None else None
    if fused is not None and w is not None:
        qkv = F.linear(x, w).view(1, -1, 1, hd)  # (1, heads + 2 * kv_heads, 1, hd)
        nq, nk = fused.splits[0] // hd, fused.splits[1] // hd
        qk = qkv[:, : nq + nk]  # q and k rotate alike, element by element: one rotation for both
        qk = (qk * cos) + (qk.roll(hd // 2, -1) * sin)  # rotate_half(qk) * sin, see StepInputs.rope_heads
        q, k, v = qk[:, :nq], qk[:, nq:], qkv[:, nq + nk :]
    else:
        q, k, v = (_linear(attn.q_proj, x, one_row), _linear(attn.k_proj, x, one_row), _linear(attn.v_proj, x, one_row))
        if one_row:  # (1, 1, n * hd) -> (1, n, 1, hd): the same values as view + transpose, one call
            q, k, v = q.view(1, -1, 1, hd), k.view(1, -1, 1, hd), v.view(1, -1, 1, hd)
        else:
            shape = (*input_shape, -1, hd)
            q, k, v = q.view(shape).transpose(1, 2), k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2)
        # (B, heads, t, hd), (B, kv_heads, t, hd) x 2
        q = (q * cos) + (q.roll(hd // 2, -1) * sin)  # rotate_half(q) * sin, see StepInputs.rope_heads
        k = (k * cos) + (k.roll(hd // 2, -1) * sin)
    k, v = cache.update(k, v, attn.layer_idx)
    if one_row and mask is None and k.shape[-1] == v.shape[-1] <= 256:
        # sdpa_attention_forward's own branch for one query without a mask: grouped heads in sdpa
        groups = attn.num_key_value_groups
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None, dropout_p=0.0, scale=attn.scaling, is_causal=False,
            **({"enable_gqa": True} if groups > 1 else {}),
        )  # (1, heads, 1, hd), contiguous: its transpose(1, 2) + contiguous() is the same memory
        o = o.view(1, 1, -1)  # (1, 1, heads * hd)
    else:
        o, _ = sdpa_attention_forward(attn, q, k, v, mask, dropout=0.0, scaling=attn.scaling)
        o = o.reshape(*input_shape, -1).contiguous()  # (B, t, heads * hd)
    return _linear(attn.o_proj, o, one_row)
