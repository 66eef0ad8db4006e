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


class LlamaFamily(RotaryDecoderFamily):
    name: ClassVar[str] = "llama"
    model_types: ClassVar[tuple[str, ...]] = ("llama", "mistral", "qwen2")

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
    return residual + _mlp(layer.mlp, h, step.one_row)


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


def _mlp(mlp: Any, x: torch.Tensor, one_row: bool) -> torch.Tensor:
    """``LlamaMLP.forward``: ``down(act(gate(x)) * up(x))``."""
    if type(mlp) not in _MLPS:
        out: torch.Tensor = mlp(x)
        return out
    gate = _linear(mlp.gate_proj, x, one_row)
    act = F.silu(gate) if type(mlp.act_fn) is SiLUActivation else mlp.act_fn(gate)
    return _linear(mlp.down_proj, act * _linear(mlp.up_proj, x, one_row), one_row)


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
    q, k, v = (_linear(attn.q_proj, x, one_row), _linear(attn.k_proj, x, one_row), _linear(attn.v_proj, x, one_row))
    if one_row:  # (1, 1, n * hd) -> (1, n, 1, hd): the same values as view + transpose, one call
        q, k, v = q.view(1, -1, 1, hd), k.view(1, -1, 1, hd), v.view(1, -1, 1, hd)
    else:
        shape = (*input_shape, -1, hd)
        q, k, v = q.view(shape).transpose(1, 2), k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2)
    # (B, heads, t, hd), (B, kv_heads, t, hd) x 2
    cos, sin = step.rope_heads  # (B, 1, t, hd): unsqueezed once per step
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
