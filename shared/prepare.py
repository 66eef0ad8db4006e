"""Preparing a generation for a front end: model, parts and pipeline, split or full.

Both front ends (the headless CLI and the TUI) call these; they never build parts themselves.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import ModelNotFound, UsageError
from .plan import Fingerprint, SplitPlan

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from ..protos import trunk_pb2 as pb
    from .client import TrunkClient
    from .failover import OnReconnect, RetryPolicy
    from .generation import LocalPipeline, SplitPipeline
    from .models import Family, ModelSource, Part

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A resolved model with its tokenizer and end tokens (weights load per part)."""

    source: ModelSource
    family: Family
    tokenizer: PreTrainedTokenizerBase
    eos_ids: list[int]

    @property
    def num_layers(self) -> int:
        return int(self.source.config.num_hidden_layers)


def load_model(spec: str | None) -> LoadedModel:
    from .models import family_for, resolve

    source = resolve(spec)
    family = family_for(source.config)
    return LoadedModel(source, family, source.load_tokenizer(), source.generation_eos())


def client_model_spec(explicit: str | None, info: pb.InfoReply) -> str:
    """The model the client loads: ``--model``/``SPLITLM_MODEL``, else the daemon's own when it
    resolves here (``smollm2`` always does).

    Raises:
        ModelNotFound: the daemon's model is not on this machine and none was given.
    """
    import os

    from .models import resolve

    if explicit or os.environ.get("SPLITLM_MODEL"):
        return explicit or os.environ["SPLITLM_MODEL"]
    theirs = info.plan.model_id
    try:
        resolve(theirs)
    except ModelNotFound:
        raise ModelNotFound(
            f"the daemon serves {theirs!r}, which does not resolve on this machine; "
            "pass --model with the same model (a .gguf file or a directory)"
        ) from None
    return theirs


def plan_dict(model: LoadedModel, split: tuple[int, int] | None, fingerprint: str | None) -> dict[str, Any]:
    return {
        "model": model.source.model_id,
        "layers": model.num_layers,
        "split": list(split) if split else None,
        "fingerprint": fingerprint,
    }


def full_pipeline(
    model: LoadedModel, dtype: torch.dtype, device: torch.device, weights: str | None = None
) -> LocalPipeline:
    """The whole model here; ``weights`` (``--weights``) overrides ``dtype`` when given."""
    from .generation import LocalPipeline
    from .models import PartSpec, build_part
    from .models.precision import apply_precision, precision_named

    precision = precision_named(weights, device) if weights else None
    part = build_part(
        model.source, model.family, PartSpec.full(model.num_layers), precision.dtype if precision else dtype, device
    )
    if precision:
        apply_precision([part], precision)
    return LocalPipeline(part)


@dataclass
class SplitParts:
    """The client's two parts for a daemon's plan."""

    plan: SplitPlan
    fingerprint: Fingerprint
    bottom: Part
    top: Part
    trunk_dtype: torch.dtype
    full: Part | None = None


def split_parts(
    model: LoadedModel,
    info: pb.InfoReply,
    device: torch.device,
    with_full: bool = False,
    weights: str | None = None,
) -> SplitParts:
    """Bottom and top for the daemon's plan, after checking the plan matches this model.

    With ``with_full`` the whole model is built too, sharing the same tensors (``compare``), at
    the same precision. ``weights`` (``--weights``, or an explicit ``--dtype``; see
    ``precision.client_weights``) must be the daemon's; None takes the daemon's. There is no
    dtype argument: the precision decides the parts' dtype.

    Raises:
        UsageError: the daemon's model or weight precision differs from this one (checked
            before loading weights).
    """
    from . import codec
    from .models import PartSpec, build_parts
    from .models.precision import apply_precision, precision_named

    precision = precision_named(weights or info.plan.weights, device)

    p = info.plan
    if p.num_layers != model.num_layers:
        raise UsageError(
            f"the daemon serves {p.model_id!r} with {p.num_layers} layers; the model here has "
            f"{model.num_layers}: pass the daemon's model with --model"
        )
    plan = SplitPlan(model.num_layers, p.trunk_start, p.trunk_end)
    fp = Fingerprint(
        model.source.config_digest(), model.source.weights_digest(), plan.start, plan.end, precision.tag
    )
    theirs = Fingerprint(p.config_digest, p.weights_digest, p.trunk_start, p.trunk_end, p.weights or "float32")
    if precision.tag != theirs.precision:
        raise UsageError(
            f"the daemon's trunk runs with --weights {theirs.precision}, this client with "
            f"{precision.tag}: both sides must run at one precision; pass --weights {theirs.precision} "
            "(or leave --weights and --dtype unset to take the daemon's)"
        )
    if fp.digest != p.fingerprint:
        raise UsageError(
            f"the model here ({model.source.model_id}) is not the daemon's ({p.model_id}): "
            f"{'; '.join(theirs.differences(fp))}; pass the daemon's model with --model"
        )
    specs = [PartSpec.bottom(plan.start), PartSpec.top(plan.end, plan.num_layers)]
    if with_full:
        specs.append(PartSpec.full(plan.num_layers))
    parts = build_parts(model.source, model.family, specs, precision.dtype, device)
    apply_precision(parts, precision)
    return SplitParts(plan, fp, parts[0], parts[1], codec.TORCH_OF[p.dtype], parts[2] if with_full else None)


def split_pipeline(
    parts: SplitParts,
    client: TrunkClient,
    wire_dtype: torch.dtype | None = None,
    retry: RetryPolicy | None = None,
    on_reconnect: OnReconnect | None = None,
) -> SplitPipeline:
    """A split pipeline on a new session.

    Args:
        retry: failover policy (default ``RetryPolicy()``: reconnect for up to 180 s and rebuild
            the trunk cache; ``NO_FAILOVER`` turns it off).
        on_reconnect: told of each reconnect attempt and of the resume, on the stepping thread.
    """
    from .failover import RetryPolicy
    from .generation import SplitPipeline

    session = client.open_session(
        parts.fingerprint, wire_dtype or parts.trunk_dtype, retry or RetryPolicy(), on_reconnect
    )
    return SplitPipeline(parts.bottom, session, parts.top)
