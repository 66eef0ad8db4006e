"""Split plans: where a model is cut, checked before anything loads, and their fingerprint."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from .errors import PlanError


def valid_range_text(num_layers: int) -> str:
    """The rule for a plan of a model with ``num_layers`` layers, for error messages."""
    return (
        f"a split A:B needs 0 < A < B < {num_layers} for this model of {num_layers} layers "
        f"(A from 1 to {num_layers - 2}, B from A+1 to {num_layers - 1})"
    )


@dataclass(frozen=True)
class SplitPlan:
    """Where the model is cut: bottom ``[0, start)``, trunk ``[start, end)``, top ``[end, L)``.

    Attributes:
        num_layers: L, the model's decoder layer count.
        start: a, the first trunk layer (the bottom keeps at least one layer).
        end: b, one past the last trunk layer (the top keeps at least one layer).
    """

    num_layers: int
    start: int
    end: int

    def __post_init__(self) -> None:
        if self.num_layers < 3:
            raise PlanError(
                f"a model needs at least 3 layers to be split in three; this one has {self.num_layers}"
            )
        if not 0 < self.start < self.end < self.num_layers:
            raise PlanError(f"split {self.start}:{self.end} is out of range: {valid_range_text(self.num_layers)}")

    @property
    def split(self) -> tuple[int, int]:
        return (self.start, self.end)

    def __str__(self) -> str:
        return f"{self.start}:{self.end}"

    @classmethod
    def parse(cls, text: str | None, num_layers: int, default: tuple[int, int]) -> SplitPlan:
        """A plan from ``--split A:B`` text, or the family's default when ``text`` is empty.

        Raises:
            PlanError: the text is malformed or the plan is outside ``0 < A < B < L``.
        """
        if not text:
            return cls(num_layers, *default)
        parts = text.replace(",", ":").split(":")
        try:
            a, b = (int(p) for p in parts)
        except ValueError:
            raise PlanError(f"--split must look like A:B, got {text!r}; {valid_range_text(num_layers)}") from None
        return cls(num_layers, a, b)


def default_split(num_layers: int, model_type: str) -> tuple[int, int]:
    """GPT-2 of 12 layers: the classic ``2:10``; any other model: 2 layers at each end.

    Models too small for two at each end keep one at each end.
    """
    if model_type == "gpt2" and num_layers == 12:
        return (2, 10)
    if num_layers >= 5:
        return (2, num_layers - 2)
    return (1, num_layers - 1)


@dataclass(frozen=True)
class Fingerprint:
    """What both sides must agree on before hidden states may cross.

    Attributes:
        config_digest: digest of the model config (architecture, sizes, rope, norms...).
        weights_digest: digest of the weights' identity (file headers, sizes, sampled content).
        start, end: the trunk range.
        precision: the weight precision (``--weights``): ``float32``, ``bfloat16``, ``int8``...;
            float32 adds nothing to the digest, so float32 digests are those of before.
    """

    config_digest: str
    weights_digest: str
    start: int
    end: int
    precision: str = "float32"

    @property
    def digest(self) -> str:
        text = f"{self.config_digest}/{self.weights_digest}/{self.start}:{self.end}"
        if self.precision != "float32":
            text += f"/{self.precision}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def differences(self, other: Fingerprint) -> list[str]:
        """Plain words for each component that differs from ``other``."""
        out = []
        if self.config_digest != other.config_digest:
            out.append(f"model config ({other.config_digest} here, {self.config_digest} from the client)")
        if self.weights_digest != other.weights_digest:
            out.append(f"weights ({other.weights_digest} here, {self.weights_digest} from the client)")
        if (self.start, self.end) != (other.start, other.end):
            out.append(f"trunk range ({other.start}:{other.end} here, {self.start}:{self.end} from the client)")
        if self.precision != other.precision:
            out.append(
                f"weight precision ({other.precision} here, {self.precision} from the client): "
                f"pass --weights {other.precision}"
            )
        return out
