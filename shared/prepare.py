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
    from .models import Family, ModelSource, Part, PartChain
    from .models.precision import Precision
    from .route import RouteClient

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


def precision_of(weights: str | None, device: torch.device, group_size: int = 32) -> Precision:
    """``--weights`` (or an explicit ``--dtype``; see ``precision.client_weights``) with
    ``--group-size``, as a ``Precision``."""
    import torch

    from .models.precision import precision_named, resolve_precision

    if weights == "float16":
        return precision_named(weights, device)
    return resolve_precision(weights, torch.float32, False, device, group_size)


def full_pipeline(
    model: LoadedModel,
    dtype: torch.dtype,
    device: torch.device,
    weights: str | None = None,
    trunk_weights: str | None = None,
    split: tuple[int, int] | None = None,
    group_size: int = 32,
) -> LocalPipeline:
    """The whole model here.

    Args:
        weights: ``--weights``; overrides ``dtype`` when given.
        trunk_weights: ``--trunk-weights``: the layers of ``split`` (default: the family's) at
            this precision and the rest at ``weights``, as a split with a trunk at this precision
            computes them. Unset or equal to ``weights``: one precision throughout.

    Raises:
        UsageError: a precision this model or device cannot run (before any weights load).
    """
    from .generation import LocalPipeline
    from .models import PartChain, PartSpec, build_part, build_parts
    from .models.precision import Precision, check_source
    from .plan import default_split

    here = precision_of(weights, device, group_size) if weights else Precision(str(dtype).removeprefix("torch."), dtype)
    check_source(here, model.source)
    trunk = precision_of(trunk_weights, device, group_size) if trunk_weights not in (None, "auto") else here
    if trunk != here:
        check_source(trunk, model.source)  # the same precision was checked just above
    n = model.num_layers
    if trunk == here:
        return LocalPipeline(build_part(model.source, model.family, PartSpec.full(n), here.dtype, device, here))
    plan = SplitPlan.parse(
        f"{split[0]}:{split[1]}" if split else None, n, default_split(n, model.source.config.model_type)
    )
    bottom, top = build_parts(
        model.source, model.family, [PartSpec.bottom(plan.start), PartSpec.top(plan.end, n)], here.dtype, device, here
    )
    middle = build_part(model.source, model.family, PartSpec.trunk(plan.start, plan.end), trunk.dtype, device, trunk)
    return LocalPipeline(PartChain([bottom, middle, top]))


@dataclass
class SplitParts:
    """The client's two parts for a daemon's plan.

    Attributes:
        full: with ``with_full``, the whole model here at the same per-part precision: a
            ``Part`` sharing the bottom's and top's tensors when both sides run one precision,
            else a ``PartChain`` of the bottom, a trunk built here at the daemon's precision, and
            the top.
    """

    plan: SplitPlan
    fingerprint: Fingerprint
    bottom: Part
    top: Part
    trunk_dtype: torch.dtype
    full: Part | PartChain | None = None
    precision: str = "float32"
    """The precision of the bottom and top (the trunk's is ``fingerprint.precision``)."""


def split_parts(
    model: LoadedModel,
    info: pb.InfoReply,
    device: torch.device,
    with_full: bool = False,
    weights: str | None = None,
    group_size: int = 32,
    trunk_weights: str | None = None,
) -> SplitParts:
    """Bottom and top for the daemon's plan, after checking the plan matches this model.

    ``info`` is one daemon's answer, or a route's (``RouteClient.info``: the range of the whole
    chain, so the bottom and top follow from the route).

    Each side has its own precision: ``weights`` (``--weights``, or an explicit ``--dtype``; see
    ``precision.client_weights``) is the bottom's and top's, None takes the daemon's; the trunk's
    is the daemon's, which a client cannot change (``trunk_weights``, when given, must name it).
    With ``with_full`` the whole model is built too, at the same per-part precision (``compare``).

    Raises:
        UsageError: the daemon's model differs from this one, or ``trunk_weights`` from the
            daemon's precision, or this model cannot run ``weights`` (all before loading weights).
    """
    from . import codec
    from .models import PartChain, PartSpec, build_part, build_parts
    from .models.precision import check_source

    p = info.plan
    theirs_tag = p.weights or "float32"
    if trunk_weights not in (None, "auto") and precision_of(trunk_weights, device, group_size).tag != theirs_tag:
        raise UsageError(
            f"the daemon's trunk runs with --weights {theirs_tag}, not {trunk_weights} (--trunk-weights): "
            "a client cannot change the daemon's precision; restart the daemon with "
            f"--weights {trunk_weights}, or leave --trunk-weights unset"
        )
    here = precision_of(weights, device, group_size) if weights else None
    if p.num_layers != model.num_layers:
        raise UsageError(
            f"the daemon serves {p.model_id!r} with {p.num_layers} layers; the model here has "
            f"{model.num_layers}: pass the daemon's model with --model"
        )
    plan = SplitPlan(model.num_layers, p.trunk_start, p.trunk_end)
    fp = Fingerprint(
        model.source.config_digest(), model.source.weights_digest(), plan.start, plan.end, theirs_tag
    )
    theirs = Fingerprint(p.config_digest, p.weights_digest, p.trunk_start, p.trunk_end, theirs_tag)
    if fp.digest != p.fingerprint:
        raise UsageError(
            f"the model here ({model.source.model_id}) is not the daemon's ({p.model_id}): "
            f"{'; '.join(theirs.differences(fp))}; pass the daemon's model with --model"
        )
    if here is None:
        here = _trunk_precision(theirs_tag, device)
    check_source(here, model.source)
    specs = [PartSpec.bottom(plan.start), PartSpec.top(plan.end, plan.num_layers)]
    same = here.tag == theirs_tag
    if with_full and same:
        specs.append(PartSpec.full(plan.num_layers))
    parts = build_parts(model.source, model.family, specs, here.dtype, device, here)
    full: Part | PartChain | None = None
    if with_full:
        if same:
            full = parts[2]
        else:
            t = _trunk_precision(theirs_tag, device)
            middle = build_part(model.source, model.family, PartSpec.trunk(plan.start, plan.end), t.dtype, device, t)
            full = PartChain([parts[0], middle, parts[1]])
    return SplitParts(plan, fp, parts[0], parts[1], codec.TORCH_OF[p.dtype], full, here.tag)


def _trunk_precision(tag: str, device: torch.device) -> Precision:
    """The daemon's precision as this client runs it (its own default, and the chain's trunk)."""
    from .models.precision import precision_named

    try:
        return precision_named(tag, device)
    except UsageError as e:
        raise UsageError(f"the daemon runs --weights {tag}, which this client cannot run here ({e}): pass --weights") from None


def split_pipeline(
    parts: SplitParts,
    client: TrunkClient | RouteClient,
    wire_dtype: torch.dtype | None = None,
    retry: RetryPolicy | None = None,
    on_reconnect: OnReconnect | None = None,
) -> SplitPipeline:
    """A split pipeline on a new session (over a route: one session per hop, ``shared.route``).

    Args:
        retry: failover policy (default ``RetryPolicy()``: reconnect for up to 180 s and rebuild
            the trunk cache; ``NO_FAILOVER`` turns it off).
        on_reconnect: told of each reconnect attempt and of the resume, on the stepping thread.
    """
    from .failover import RetryPolicy
    from .generation import SplitPipeline

    session = client.open_session(
        parts.fingerprint, wire_dtype or parts.trunk_dtype, retry or RetryPolicy(), on_reconnect,
        client_weights=parts.precision,
    )
    return SplitPipeline(parts.bottom, session, parts.top)
