"""The Llama family: Llama, Mistral, Qwen2, SmolLM2 (rotary positions, grouped-query attention,
RMSNorm; Mistral and Qwen2 may use sliding-window layers, kept per layer index)."""

from __future__ import annotations

from typing import ClassVar

from .decoder import RotaryDecoderFamily


class LlamaFamily(RotaryDecoderFamily):
    name: ClassVar[str] = "llama"
    model_types: ClassVar[tuple[str, ...]] = ("llama", "mistral", "qwen2")
