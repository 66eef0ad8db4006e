"""The teacher, the students and one training step of ``splitlm distill``.

The teacher is the served model run whole here from the same weights as the client's (its
digests are the daemon's, so it computes what the split computes). A *bridge* student is the base
model with its trunk ``[a, b)`` replaced by ``n`` layers: the teacher's own bottom output feeds
them and its own top (frozen) turns them into logits, so gradients reach only the ``n`` layers. A
*standalone* student is a smaller model of the same family (``n`` layers taken from evenly spaced
layers of the base, with its embedding, final norm and head), trained in its layers and norm.

Loss: ``KL(teacher_T || student_T) * T^2`` over every position (both softened by the temperature
``T``), plus ``hard_weight`` times the cross-entropy of the student on the next tokens.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ...shared.cache import PartCache
from ...shared.draft.student import layer_module

if TYPE_CHECKING:
    from ...shared.models import Part


def evenly_spaced(start: int, end: int, n: int) -> list[int]:
    """``n`` layer indices spread over ``[start, end)``: both ends for n >= 2, the middle for 1."""
    if n == 1:
        return [start + (end - start - 1) // 2]
    return [start + round(i * (end - 1 - start) / (n - 1)) for i in range(n)]


@dataclass
class Batch:
    ids: torch.Tensor  # (B, T)

    @property
    def positions(self) -> torch.Tensor:
        return torch.arange(self.ids.shape[1], device=self.ids.device).unsqueeze(0)  # (1, T)


class Teacher:
    """The full model, frozen: its logits and the hidden states leaving the bottom."""

    def __init__(self, full: Part) -> None:
        self.full = full
        for p in full.model.parameters():
            p.requires_grad_(False)

    @property
    def num_layers(self) -> int:
        return self.full.num_layers

    def run(self, batch: Batch, cut: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits ``(B, T, V)``, hidden states after layer ``cut - 1`` ``(B, T, H)``)."""
        fam, model, cfg, pos = self.full.family, self.full.model, self.full.config, batch.positions
        with torch.no_grad():
            h = fam.embed(model, batch.ids, pos)
            h0 = fam.run_layers(model, h, pos, PartCache(cfg, 0, cut))
            h = fam.run_layers(model, h0, pos, PartCache(cfg, cut, self.num_layers))
            return fam.head(model, h), h0

    def top(self, h: torch.Tensor, start: int, batch: Batch) -> torch.Tensor:
        """Layers ``[start, L)``, norm and head over ``h`` (gradients flow to ``h``, not to the
        frozen weights)."""
        fam, model = self.full.family, self.full.model
        h = fam.run_layers(model, h, batch.positions, PartCache(self.full.config, start, self.num_layers))
        return fam.head(model, h)


class BridgeStudent:
    """The ``n`` layers replacing the trunk ``[a, b)``: a part ``trunk(a, a + n)`` of the base
    model whose layers start as copies of ``init_from`` and are trained."""

    kind = "bridge"

    def __init__(self, teacher: Teacher, mid: Part, plan: tuple[int, int], init_from: Sequence[int]) -> None:
        self.teacher, self.mid, self.plan = teacher, mid, plan
        self.n = mid.spec.end - mid.spec.start
        self.init_from = list(init_from)
        a = plan[0]
        with torch.no_grad():
            for j, src in enumerate(self.init_from):
                own = layer_module(mid, a + j)
                own.load_state_dict(layer_module(teacher.full, src).state_dict())
        self.layers = [layer_module(mid, a + j) for j in range(self.n)]
        for layer in self.layers:
            for p in layer.parameters():
                p.requires_grad_(True)

    def named_parameters(self) -> dict[str, nn.Parameter]:
        return {f"layers.{j}.{name}": p for j, layer in enumerate(self.layers) for name, p in layer.named_parameters()}

    def layer_weights(self) -> list[dict[str, torch.Tensor]]:
        return [{k: v.detach() for k, v in layer.state_dict().items()} for layer in self.layers]

    def logits(self, batch: Batch, h0: torch.Tensor) -> torch.Tensor:
        a, b = self.plan
        fam, mid = self.mid.family, self.mid
        h = fam.run_layers(mid.model, h0, batch.positions, PartCache(mid.config, a, a + self.n))
        return self.teacher.top(h, b, batch)


class StandaloneStudent:
    """A model of ``n`` layers of the base family, initialised from the base's own layers
    ``init_from`` (with its embedding, final norm and head); trained in its layers and norm."""

    kind = "standalone"

    def __init__(self, teacher: Teacher, init_from: Sequence[int]) -> None:
        from transformers import AutoModelForCausalLM

        full = teacher.full
        self.teacher = teacher
        self.init_from = list(init_from)
        self.n = len(self.init_from)
        self.plan = None
        cfg = copy.deepcopy(full.config)
        cfg.num_hidden_layers = self.n
        types = getattr(cfg, "layer_types", None)
        if isinstance(types, list) and len(types) == full.num_layers:
            cfg.layer_types = [types[i] for i in self.init_from]
        self.config = cfg
        self.model = AutoModelForCausalLM.from_config(cfg).to(full.device)
        self.model.eval()
        prefix = full.family.layer_prefix
        base = full.model.state_dict()
        state = {}
        for name in self.model.state_dict():
            src = name
            if name.startswith(prefix):
                j, rest = name[len(prefix) :].split(".", 1)
                src = f"{prefix}{self.init_from[int(j)]}.{rest}"
            if src in base:
                state[name] = base[src]
        with torch.no_grad():
            self.model.load_state_dict(state, strict=False)
        self.model.tie_weights()
        head = set(full.family.head_names) - {full.family.lm_head_name}
        self.trainable = {
            name: p for name, p in self.model.named_parameters() if name.startswith(prefix) or name in head
        }
        for name, p in self.model.named_parameters():
            p.requires_grad_(name in self.trainable)

    def named_parameters(self) -> dict[str, nn.Parameter]:
        return dict(self.trainable)

    def logits(self, batch: Batch, h0: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=batch.ids, use_cache=False)
        logits: torch.Tensor = out.logits
        return logits


Student = BridgeStudent | StandaloneStudent


def distill_loss(
    student: torch.Tensor, teacher: torch.Tensor, ids: torch.Tensor, temperature: float, hard_weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, KL part): ``KL(teacher_T || student_T) * T^2`` averaged over positions, plus
    ``hard_weight`` x cross-entropy of ``student`` on the next tokens of ``ids``."""
    v = student.shape[-1]
    s = student.float().reshape(-1, v)  # (B*T, V)
    t = teacher.float().reshape(-1, v)
    kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                  log_target=True, reduction="batchmean") * temperature**2
    loss = kl
    if hard_weight > 0:
        hard = F.cross_entropy(student[:, :-1].float().reshape(-1, v), ids[:, 1:].reshape(-1))
        loss = loss + hard_weight * hard
    return loss, kl


@dataclass(frozen=True)
class EvalResult:
    """Held-out figures.

    Attributes:
        loss: the KL part of the loss (at the run's temperature).
        acceptance: share of positions where the student's argmax is the teacher's: what a greedy
            draft would have accepted, position by position.
        positions: positions evaluated.
    """

    loss: float
    acceptance: float
    positions: int

    def tokens_per_round_trip(self, k: int = 4) -> float:
        """Expected tokens per verification step with drafts of ``k``, each position accepted
        with probability ``acceptance`` independently: ``(1 - a^(k+1)) / (1 - a)``."""
        a = self.acceptance
        return float(k + 1) if a >= 1 else (1 - a ** (k + 1)) / (1 - a)


def evaluate(teacher: Teacher, student: Student, blocks: Sequence[Sequence[int]], batch_size: int,
             temperature: float, cut: int, device: torch.device) -> EvalResult:
    total, agree, count = 0.0, 0, 0
    with torch.no_grad():
        for i in range(0, len(blocks), batch_size):
            batch = Batch(torch.tensor([list(b) for b in blocks[i : i + batch_size]], device=device))
            t_logits, h0 = teacher.run(batch, cut)
            s_logits = student.logits(batch, h0)
            _, kl = distill_loss(s_logits, t_logits, batch.ids, temperature, 0.0)
            rows = batch.ids.numel()
            total += float(kl) * rows
            agree += int((s_logits.argmax(-1) == t_logits.argmax(-1)).sum())
            count += rows
    return EvalResult(total / count, agree / count, count)
