"""A small model with the served model's tokenizer, run whole on the client as the draft.

The draft model keeps its own cache. Every ``propose`` is given the whole context; the cache is
rolled back to the longest prefix it shares with it (what the served model rejected goes), the
new tokens are fed in one step, and k tokens are drafted one position at a time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ..errors import ModelNotFound, SplitlmError, UsageError
from .base import Draft, common_prefix

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

    from ..models import ModelSource, Part
    from ..prepare import LoadedModel
    from ..sampling import SamplingSettings

log = logging.getLogger(__name__)


def parameter_count(config: PretrainedConfig) -> float:
    """Weights a decode step reads, estimated from a config (decoder layers and the LM head):
    what a step's compute on a CPU follows."""
    h = int(config.hidden_size)
    inner = int(getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * h)
    heads = int(getattr(config, "num_attention_heads", 1))
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or h // heads)
    attn = h * head_dim * (2 * heads + 2 * kv)
    mlp = (3 if config.model_type != "gpt2" else 2) * h * inner
    return float(int(config.num_hidden_layers) * (attn + mlp) + int(config.vocab_size) * h)


def relative_cost(draft: PretrainedConfig, served: PretrainedConfig) -> float:
    """One drafted token's compute as a fraction of one decode step of the served model."""
    return parameter_count(draft) / parameter_count(served)


class PartDrafter:
    """Drafts with any part that maps token ids to logits (a whole small model, or a student
    chain); subclasses give ``_logits``. Not thread-safe: one generation at a time."""

    def __init__(self, name: str, cost: float) -> None:
        self.name = name
        self.cost = cost
        self.cached: list[int] = []

    def _logits(self, ids: Sequence[int], position: int) -> torch.Tensor:
        """The next-token logits ``(V,)`` after stepping ``ids`` at ``position`` (rolling back)."""
        raise NotImplementedError

    def _reset(self) -> None:
        raise NotImplementedError

    def _floor(self) -> int:
        """The lowest position the caches roll back to without a re-prefill."""
        return 0

    @torch.inference_mode()
    def propose(
        self, context: Sequence[int], k: int, sampling: SamplingSettings, generator: torch.Generator
    ) -> Draft:
        from ..sampling import Sampler

        t0 = time.perf_counter()
        keep = common_prefix(self.cached, context)
        if keep == len(context):  # nothing new: step the last token again for its logits
            keep -= 1
        if 0 < keep < self._floor():  # a sliding window lost what a rollback that deep needs
            keep = 0
        logits = self._logits(context[keep:], keep)
        self.cached = list(context)
        sampler = Sampler(sampling)
        sampler.generator = generator  # draw with the reply's generator: reproducible per seed
        tokens: list[int] = []
        rows: list[torch.Tensor] = []
        for i in range(k):
            if sampling.greedy:
                token = int(torch.argmax(logits))
            else:
                probs = sampler.distribution(logits)
                rows.append(probs)
                token = sampler.draw(probs)
            tokens.append(token)
            if i + 1 < k:
                logits = self._logits([token], len(self.cached))
                self.cached.append(token)
        probs_out = torch.stack(rows) if rows else None
        return Draft(tokens, probs_out, time.perf_counter() - t0)

    def close(self) -> None:
        self.cached = []
        self._reset()


class ModelDrafter(PartDrafter):
    """A whole small model here (``--draft model:PATH``)."""

    def __init__(self, name: str, part: Part, cost: float) -> None:
        super().__init__(name, cost)
        self.part = part
        self.cache = part.new_cache()

    def _logits(self, ids: Sequence[int], position: int) -> torch.Tensor:
        return self.part.forward(torch.tensor([list(ids)]), position, self.cache)[0, -1]

    def _reset(self) -> None:
        self.cache = self.part.new_cache()

    def _floor(self) -> int:
        return self.cache.rollback_floor


def check_tokenizer(draft: ModelSource, draft_tok: PreTrainedTokenizerBase | None, model: LoadedModel, what: str) -> None:
    """Refuse a draft whose tokens mean something else than the served model's.

    Raises:
        UsageError: the vocabularies differ (with how), or there is nothing to compare and the
            vocabulary sizes differ.
    """
    ours = model.tokenizer
    ours_vocab = ours.get_vocab() if hasattr(ours, "get_vocab") else None
    if draft_tok is not None and ours_vocab is not None:
        theirs = draft_tok.get_vocab()
        if theirs != ours_vocab:
            differ = sum(1 for t, i in theirs.items() if ours_vocab.get(t) != i)
            raise UsageError(
                f"{what} has another tokenizer than {model.source.model_id}: {len(theirs)} tokens vs "
                f"{len(ours_vocab)}, {differ} mapped differently; a draft must share the model's tokenizer"
            )
        return
    a, b = int(draft.config.vocab_size), int(model.source.config.vocab_size)
    if a != b:
        raise UsageError(
            f"{what} has a vocabulary of {a} tokens, {model.source.model_id} of {b}; a draft must "
            "share the model's tokenizer"
        )
    log.warning("%s: no tokenizer to compare; trusting its vocabulary size (%d)", what, a)


def load_model_drafter(target: str, model: LoadedModel, device: torch.device) -> ModelDrafter:
    """``--draft model:TARGET``: a model ``--model`` accepts, checked against ``model``'s tokenizer.

    Raises:
        UsageError: the target does not load, or its tokenizer differs from the model's.
    """
    from ..models import PartSpec, build_part, family_for, resolve

    what = f"the draft model {target!r}"
    try:
        source = resolve(target)
        family = family_for(source.config)
    except SplitlmError as e:
        raise UsageError(f"--draft model:{target}: {e}") from None
    try:
        tok: PreTrainedTokenizerBase | None = source.load_tokenizer()
    except ModelNotFound:
        tok = None
    check_tokenizer(source, tok, model, what)
    part = build_part(source, family, PartSpec.full(int(source.config.num_hidden_layers)), torch.float32, device)
    cost = relative_cost(source.config, model.source.config)
    log.info("draft model %s: %d layers, %.2f of a step per drafted token", target,
             source.config.num_hidden_layers, cost)
    return ModelDrafter(f"model:{target}", part, cost)
