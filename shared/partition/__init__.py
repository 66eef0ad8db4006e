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

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .cost import (
    FLOAT_BYTES,
    EndCost,
    LayerCost,
    ModelCost,
    Tensor,
    layer_tensors,
    model_cost,
    sliding_windows,
)
from .devices import Device, parse_devices, probe_devices
from .strategies import (
    DEFAULT_STRATEGY,
    MIXED_MEMORY_WEIGHT,
    STRATEGIES,
    NothingFits,
    Partition,
    Stage,
    balanced_cuts,
    client_split,
    layer_weights,
    parse_layers,
    plan,
    stage_of,
    uniform_cuts,
)
from .text import fmt_bytes, fmt_count, fmt_flops, render

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = [
    "DEFAULT_STRATEGY", "FLOAT_BYTES", "MIXED_MEMORY_WEIGHT", "STRATEGIES", "Device", "EndCost", "LayerCost",
    "ModelCost", "NothingFits", "Partition", "Stage", "Tensor", "balanced_cuts", "client_split",
    "config_source", "fmt_bytes", "fmt_count", "fmt_flops", "layer_tensors", "layer_weights", "model_cost",
    "parse_devices", "parse_layers", "partition_for", "plan", "probe_devices", "render", "sliding_windows",
    "stage_of", "uniform_cuts",
]


def config_source(spec: str | None) -> tuple[str, PretrainedConfig, Path | None]:
    """``--model`` for a plan: the model's name, its config and its GGUF file (None for a
    directory). A directory needs only ``config.json`` (no weights: a plan of a 7B model from
    its config alone); anything else resolves as every command resolves ``--model``.

    Raises:
        ModelNotFound: nothing at ``spec``.
    """
    from ..models import resolve

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
