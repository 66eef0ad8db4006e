"""What ``--draft`` names: no draft, prompt lookup, a small model, or a distilled student.

Parsing only (no torch): the settings registry reads ``--draft`` / ``SPLITLM_DRAFT`` / TOML
``draft`` through ``DraftSpec.parse`` so a value that names nothing fails at start-up, before any
model loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import UsageError

DraftKind = Literal["off", "ngram", "model", "student"]

DRAFT_FORMS = "off, ngram, ngram:N (N = 1..8 tokens to match), model:PATH or student:PATH"
"""The accepted spellings, for error messages and ``--help``."""

NGRAM_DEFAULT = 3
"""Prompt lookup matches the last 3 tokens (then 2, then 1) by default."""


@dataclass(frozen=True)
class DraftSpec:
    """A parsed ``--draft`` value.

    Attributes:
        kind: ``off`` (plain decoding), ``ngram`` (prompt lookup), ``model`` (a small model with the
            same tokenizer, run whole here), ``student`` (a draft made by ``splitlm distill``).
        target: ``model``: what ``--model`` accepts (a directory, a .gguf, a name); ``student``: the
            student's directory; ``ngram``: the longest n-gram to match, as text.
    """

    kind: DraftKind = "off"
    target: str = ""

    @classmethod
    def parse(cls, raw: str) -> DraftSpec:
        """Read one ``--draft`` value.

        Raises:
            UsageError: the value parses to nothing (an unknown kind, a missing path, a bad n).
        """
        text = raw.strip()
        kind, sep, target = text.partition(":")
        kind, target = kind.strip().lower(), target.strip()
        if kind in ("off", "none", "") and not target:
            return cls()
        if kind == "ngram":
            if not sep:
                return cls("ngram", str(NGRAM_DEFAULT))
            if not target.isdigit() or not 1 <= int(target) <= 8:
                raise UsageError(f"--draft ngram:N needs N from 1 to 8, got {raw!r}")
            return cls("ngram", str(int(target)))
        if kind in ("model", "student"):
            if not target:
                raise UsageError(f"--draft {kind}: needs a path or name after the colon, got {raw!r}")
            return cls(kind, target)  # type: ignore[arg-type]  # kind is one of the two literals
        raise UsageError(f"--draft {raw!r} names no draft: use {DRAFT_FORMS}")

    @property
    def enabled(self) -> bool:
        return self.kind != "off"

    @property
    def ngram(self) -> int:
        """The longest n-gram prompt lookup matches (ngram drafts only)."""
        return int(self.target) if self.kind == "ngram" else 0

    def __str__(self) -> str:
        if self.kind == "off":
            return "off"
        if self.kind == "ngram" and self.target == str(NGRAM_DEFAULT):
            return "ngram"
        return f"{self.kind}:{self.target}"
