"""Students made by ``splitlm distill``: their on-disk format, and the ``student:PATH`` drafter.

A student directory holds ``student.json`` (the manifest: what the student is, which model and
plan it was made for, how it was trained) and its weights.

- A *bridge* student is the client's own bottom (layers ``[0, a)``) and top (``[b, L)``, norm,
  head) with the trunk ``[a, b)`` replaced by ``n`` new layers, initialised from trunk layers and
  trained. Only those ``n`` layers are stored (``weights-NNNNNN.safetensors``, names
  ``layers.J.<param>``); student layer ``J`` runs as the base model's layer ``a + J`` (its layer
  index, attention type, rotary), so the drafter is a ``Part`` of the base model,
  ``PartSpec.trunk(a, a + n)``, whose layer weights are replaced. It runs entirely on the client,
  sharing the bottom's and top's weights with the split pipeline (with caches of its own).
- A *standalone* student (fewer layers, the same tokenizer) is a normal model directory
  (``config.json``, safetensors, tokenizer files) that ``--model`` and ``--draft model:`` accept;
  its manifest only records where it came from.

The manifest is the commit point of a write: weights go to a new file first, then the manifest
naming it replaces the old one (``os.replace``), so a reader sees the old student or the new one,
never a mix. A manifest whose weights file is missing, truncated or altered (its SHA-256) is
refused, as is a student made for another model (config or weights digest) or another plan.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..errors import UsageError
from .model import PartDrafter

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

    from ..models import Part
    from ..prepare import LoadedModel
    from .base import Drafter

log = logging.getLogger(__name__)

MANIFEST = "student.json"
FORMAT = "splitlm-student"
VERSION = 1
StudentKind = Literal["bridge", "standalone"]


@dataclass(frozen=True)
class BaseModel:
    """The model a student was distilled from: a student only drafts for that model.

    Attributes:
        model: the ``--model`` it was made with (for messages; the digests decide).
        model_type: transformers' ``model_type``.
        num_layers: its layer count L.
        config_digest, weights_digest: ``ModelSource.config_digest()/weights_digest()``.
    """

    model: str
    model_type: str
    num_layers: int
    config_digest: str
    weights_digest: str


@dataclass(frozen=True)
class Manifest:
    """``student.json``.

    Attributes:
        kind: ``bridge`` or ``standalone``.
        base: the model it was made from.
        plan: ``[a, b]``, the trunk range a bridge replaces (a standalone: None).
        layers: n, the student's own layers.
        init_from: the base layers each of them was initialised from.
        weights: a bridge's weights file (in the directory); a standalone's: empty.
        sha256: that file's SHA-256.
        training: a short summary (steps, tokens seen, seconds, eval loss and acceptance...).
    """

    kind: StudentKind
    base: BaseModel
    plan: tuple[int, int] | None
    layers: int
    init_from: tuple[int, ...]
    weights: str = ""
    sha256: str = ""
    training: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        d = asdict(self)
        d = {"format": FORMAT, "version": VERSION, **d}
        d["plan"] = list(self.plan) if self.plan else None
        d["init_from"] = list(self.init_from)
        d["training"] = dict(self.training)
        return json.dumps(d, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, where: Path) -> Manifest:
        """Raises: UsageError: not a student manifest, or one this version cannot read."""
        try:
            d = json.loads(text)
            if not isinstance(d, dict) or d.get("format") != FORMAT:
                raise ValueError("not a splitlm student manifest")
            if d.get("version") != VERSION:
                raise ValueError(f"format version {d.get('version')!r}; this splitlm reads version {VERSION}")
            kind = d["kind"]
            if kind not in ("bridge", "standalone"):
                raise ValueError(f"kind {kind!r} is neither bridge nor standalone")
            base = BaseModel(**d["base"])
            plan = d.get("plan")
            if kind == "bridge" and not (isinstance(plan, list) and len(plan) == 2):
                raise ValueError("a bridge needs its plan [a, b]")
            return cls(
                kind=kind,
                base=base,
                plan=(int(plan[0]), int(plan[1])) if plan else None,
                layers=int(d["layers"]),
                init_from=tuple(int(i) for i in d["init_from"]),
                weights=str(d.get("weights", "")),
                sha256=str(d.get("sha256", "")),
                training=dict(d.get("training") or {}),
            )
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise UsageError(f"{where} is not a usable student manifest ({e})") from None


def base_of(model: LoadedModel) -> BaseModel:
    """The identity a student made from ``model`` records."""
    src = model.source
    return BaseModel(
        src.model_id, str(src.config.model_type), model.num_layers, src.config_digest(), src.weights_digest()
    )


def read_manifest(path: Path | str) -> Manifest:
    """The manifest of the student directory ``path``.

    Raises:
        UsageError: no such directory, no manifest, or an unreadable one.
    """
    d = Path(path).expanduser()
    if not d.is_dir():
        raise UsageError(f"student {d}: no such directory (make one with `splitlm distill --output {d}`)")
    f = d / MANIFEST
    if not f.is_file():
        raise UsageError(f"student {d}: no {MANIFEST} manifest there; is it a `splitlm distill` output directory?")
    return Manifest.from_json(f.read_text(encoding="utf-8", errors="replace"), f)


def check_base(manifest: Manifest, model: LoadedModel, where: Path | str) -> None:
    """Refuse a student made from another model, naming what differs.

    Raises:
        UsageError: another model type, layer count, config or weights.
    """
    mine, theirs = base_of(model), manifest.base
    diffs = []
    if mine.model_type != theirs.model_type or mine.num_layers != theirs.num_layers:
        diffs.append(
            f"model ({theirs.model_type}, {theirs.num_layers} layers for the student; "
            f"{mine.model_type}, {mine.num_layers} layers here)"
        )
    if mine.config_digest != theirs.config_digest:
        diffs.append(f"model config ({theirs.config_digest} for the student, {mine.config_digest} here)")
    if mine.weights_digest != theirs.weights_digest:
        diffs.append(f"weights ({theirs.weights_digest} for the student, {mine.weights_digest} here)")
    if diffs:
        raise UsageError(
            f"student {where} was made for another model ({theirs.model}, not {mine.model}): "
            f"{'; '.join(diffs)}; distill one from this model with `splitlm distill --model {mine.model}`"
        )


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all: a temporary file beside it, synced, then renamed."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_bridge(directory: Path, manifest: Manifest, layers: Sequence[Mapping[str, torch.Tensor]], step: int) -> Manifest:
    """Write a bridge student: its layers' weights to a new file, then the manifest naming it.

    Args:
        layers: per student layer, its parameters by name within the layer (``self_attn.q_proj.weight``).
        step: the training step, naming the weights file (the old file is removed once the new
            manifest is in place).

    Returns:
        The manifest written (with the file's name and SHA-256).
    """
    from safetensors.torch import save

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"layers.{j}.{name}": t.detach().to("cpu").contiguous() for j, layer in enumerate(layers) for name, t in layer.items()}
    data = save(tensors, metadata={"format": FORMAT, "step": str(step)})
    name = f"weights-{step:06d}.safetensors"
    atomic_write_bytes(directory / name, data)
    out = Manifest(
        manifest.kind, manifest.base, manifest.plan, manifest.layers, manifest.init_from, name,
        hashlib.sha256(data).hexdigest(), manifest.training,
    )
    atomic_write_bytes(directory / MANIFEST, out.to_json().encode())
    for old in directory.glob("weights-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return out


def load_bridge_layers(directory: Path, manifest: Manifest) -> list[dict[str, torch.Tensor]]:
    """A bridge student's layers' weights, checked against the manifest.

    Raises:
        UsageError: the file is missing, truncated or altered, or lacks a layer.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    f = directory / manifest.weights
    if not manifest.weights or not f.is_file():
        raise UsageError(f"student {directory}: its weights file {manifest.weights or '(none named)'} is missing")
    data = f.read_bytes()
    if hashlib.sha256(data).hexdigest() != manifest.sha256:
        raise UsageError(
            f"student {directory}: {manifest.weights} is corrupt or truncated ({len(data)} bytes; its "
            "SHA-256 differs from the manifest's); distill it again or resume from its checkpoint"
        )
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise UsageError(f"student {directory}: {manifest.weights} is not a readable safetensors file ({e})") from None
    layers: list[dict[str, torch.Tensor]] = [{} for _ in range(manifest.layers)]
    for key, t in tensors.items():
        _, j, name = key.split(".", 2)
        if not j.isdigit() or int(j) >= manifest.layers:
            raise UsageError(f"student {directory}: unexpected tensor {key!r} for {manifest.layers} layers")
        layers[int(j)][name] = t
    if any(not layer for layer in layers):
        raise UsageError(f"student {directory}: {manifest.weights} lacks some of its {manifest.layers} layers")
    return layers


def layer_module(part: Part, index: int) -> torch.nn.Module:
    """Decoder layer ``index`` (the base model's numbering) of ``part``'s model."""
    return part.model.get_submodule(part.family.layer_prefix + str(index))


def bridge_part(model: LoadedModel, plan: tuple[int, int], n: int, dtype: torch.dtype, device: torch.device) -> Part:
    """The student's layers as a part of the base model: ``PartSpec.trunk(a, a + n)``, holding the
    base's layers ``[a, a + n)`` until their weights are replaced (caches, rotary, masks and
    sliding windows are then the base model's own code)."""
    from ..models import PartSpec, build_part

    a, _ = plan
    return build_part(model.source, model.family, PartSpec.trunk(a, a + n), dtype, device)


def set_bridge_weights(part: Part, layers: Sequence[Mapping[str, torch.Tensor]], where: Path | str) -> None:
    """Copy a student's layer weights into ``part`` (from ``bridge_part``).

    Raises:
        UsageError: a layer's tensors do not fit (names or shapes).
    """
    import torch

    a = part.spec.start
    for j, weights in enumerate(layers):
        module = layer_module(part, a + j)
        try:
            with torch.no_grad():
                module.load_state_dict({k: v.to(part.dtype) for k, v in weights.items()}, strict=True)
        except RuntimeError as e:
            first = str(e).splitlines()[0]
            raise UsageError(f"student {where}: layer {j} does not fit this model ({first})") from None


def bridge_cost(config: PretrainedConfig, own_layers: int) -> float:
    """One drafted token's compute relative to one decode step of the served model: the weights a
    step reads (``model.parameter_count``) with ``own_layers`` layers instead of all. Fixed when
    the drafter is built, never measured."""
    from .model import parameter_count

    mine = copy.deepcopy(config)
    mine.num_hidden_layers = own_layers
    return parameter_count(mine) / parameter_count(config)


class BridgeDrafter(PartDrafter):
    """A bridge student run on the client: bottom, the student's layers, top, each with a cache of
    its own (the bottom and top weights may be the split pipeline's own parts).

    Called from the generation loop's thread only (see ``Drafter``); ``PartDrafter.propose``
    rolls the caches back to the prefix they share with the context and drafts token by token.
    """

    def __init__(self, name: str, bottom: Part, mid: Part, top: Part) -> None:
        n = mid.spec.end - mid.spec.start
        super().__init__(name, bridge_cost(bottom.config, bottom.spec.end + n + bottom.num_layers - top.spec.start))
        self.bottom, self.mid, self.top = bottom, mid, top
        self._reset()

    def _reset(self) -> None:
        self.caches = (self.bottom.new_cache(), self.mid.new_cache(), self.top.new_cache())

    def _floor(self) -> int:
        return max(c.rollback_floor for c in self.caches)

    def _logits(self, ids: Sequence[int], position: int) -> torch.Tensor:
        """Logits ``(V,)`` after feeding ``ids`` at ``position`` through all three caches."""
        import torch

        h = self.bottom.forward(torch.tensor([list(ids)]), position, self.caches[0])
        h = self.mid.forward(h, position, self.caches[1])
        return self.top.forward(h, position, self.caches[2])[0, -1]  # (1, 1, V) -> (V,)


def load_student_drafter(
    path: str | Path,
    model: LoadedModel,
    device: torch.device,
    bottom: Part | None = None,
    top: Part | None = None,
) -> Drafter:
    """The drafter of the student directory ``path`` for the served ``model``.

    Args:
        bottom, top: the client's parts (the split pipeline's); the drafter shares their weights,
            and they fix the plan the student must have been made for. Without them (``--full``)
            the drafter builds its own from the student's plan.

    Raises:
        UsageError: no manifest, a student made for another model or another plan, a missing,
            truncated or altered weights file.
    """
    d = Path(path).expanduser()
    manifest = read_manifest(d)
    check_base(manifest, model, d)
    if manifest.kind == "standalone":
        from .model import load_model_drafter

        weights = d / (manifest.weights or "model.safetensors")
        if not weights.is_file() or (manifest.sha256 and file_sha256(weights) != manifest.sha256):
            raise UsageError(f"student {d}: {weights.name} is missing, corrupt or truncated (its SHA-256 "
                             "differs from the manifest's)")
        drafter = load_model_drafter(str(d), model, device)
        drafter.name = f"student:{path}"
        return drafter
    assert manifest.plan is not None  # from_json refuses a bridge without one
    plan = manifest.plan
    if bottom is not None and top is not None:
        here = (bottom.spec.end, top.spec.start)
        if here != plan:
            raise UsageError(
                f"student {d} was made for the plan {plan[0]}:{plan[1]} (trunk layers), but the daemon "
                f"here serves {here[0]}:{here[1]}; distill one for this plan (`splitlm distill --split "
                f"{here[0]}:{here[1]}`) or run the daemon with --split {plan[0]}:{plan[1]}"
            )
    layers = load_bridge_layers(d, manifest)
    import torch

    if bottom is None or top is None:
        from ..models import PartSpec, build_parts

        bottom, top = build_parts(
            model.source, model.family,
            [PartSpec.bottom(plan[0]), PartSpec.top(plan[1], model.num_layers)], torch.float32, device,
        )
    mid = bridge_part(model, plan, manifest.layers, bottom.dtype, device)
    set_bridge_weights(mid, layers, d)
    log.info("student %s: bridge of %d layers for plan %d:%d", d, manifest.layers, *plan)
    return BridgeDrafter(f"student:{path}", bottom, mid, top)
