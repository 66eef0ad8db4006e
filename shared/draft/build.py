"""Building the drafter ``--draft`` names, for any face (CLI, chat app, bench)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .spec import DraftSpec

if TYPE_CHECKING:
    import torch

    from ..models import Part
    from ..prepare import LoadedModel
    from .base import Drafter


def build_drafter(
    spec: DraftSpec | str,
    model: LoadedModel,
    device: torch.device,
    bottom: Part | None = None,
    top: Part | None = None,
) -> Drafter | None:
    """The drafter of ``spec`` for ``model`` (None for ``off``).

    Args:
        spec: the ``--draft`` value.
        model: the served model (its tokenizer and config decide what a draft must match).
        device: where a draft model runs.
        bottom, top: the client's parts when it has them; a student shares their weights.

    Raises:
        UsageError: the draft does not fit the model (another tokenizer, a student made for
            another model or plan, a corrupt checkpoint), with what differs.
    """
    if isinstance(spec, str):
        spec = DraftSpec.parse(spec)
    if spec.kind == "off":
        return None
    if spec.kind == "ngram":
        from .ngram import NgramDrafter

        return NgramDrafter(spec.ngram)
    if spec.kind == "model":
        from .model import load_model_drafter

        return load_model_drafter(spec.target, model, device)
    from .student import load_student_drafter

    return load_student_drafter(spec.target, model, device, bottom=bottom, top=top)
