"""Drafts for speculative decoding: proposals the served model verifies k at a time.

A drafter proposes up to k next tokens for a context; the generation loop
(``shared.generation``) sends the last token and the k drafted ones in one step, keeps the longest
prefix the model agrees with (greedy) or accepts by the speculative-sampling rule (sampling), and
rolls the caches back past the rest. ``spec`` parses ``--draft``; the drafters live one per module.
"""

from __future__ import annotations

from .spec import DRAFT_FORMS, DraftKind, DraftSpec

__all__ = ["DRAFT_FORMS", "DraftKind", "DraftSpec"]
