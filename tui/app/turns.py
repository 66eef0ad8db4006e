"""A conversation as the model sees it: messages to token ids, and where a turn starts.

The trunk session stays open across turns; its cache holds the ids of the conversation so far.
A new turn's ids extend them, so only the new part is stepped. Regenerate and edit step again
from an earlier position, which rolls the caches back (the daemon and the local parts truncate).
Pure functions: tested without a model or a UI.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ...shared.draft.base import common_prefix

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class Message:
    """One message of a conversation.

    Attributes:
        role: who wrote it.
        content: the text.
        finish_reason: for a reply: ``eos``, ``length``, ``stop``, ``cancelled`` (Esc) or
            ``failed`` (the daemon went away); empty for prompts.
    """

    role: Role
    content: str
    finish_reason: str = ""


@dataclass(frozen=True)
class TurnPlan:
    """Where a reply's generation starts.

    Attributes:
        start: the position of the first stepped id; the caches keep ``[0, start)``.
        ids: the ids stepped at ``start`` (the new part of the prompt; never empty).
        full: the whole prompt: the conversation up to the reply's first token.
    """

    start: int
    ids: tuple[int, ...]
    full: tuple[int, ...]


def chat_messages(messages: Sequence[Message], system_prompt: str) -> list[dict[str, str]]:
    """The chat template's input: the system prompt (when set) and the messages."""
    out = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
    out.extend({"role": m.role, "content": m.content} for m in messages if m.role != "system")
    return out


def conversation_ids(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], system_prompt: str) -> list[int]:
    """The ids of the conversation with the reply's opening appended (``add_generation_prompt``).

    One user message and no system prompt gives exactly ``splitlm generate``'s ids (the shared
    ``prompt_ids``). A model without a chat template gets the texts joined by blank lines.
    """
    if getattr(tokenizer, "chat_template", None):
        out: object = tokenizer.apply_chat_template(
            chat_messages(messages, system_prompt), add_generation_prompt=True, tokenize=True
        )
        # transformers 5 answers a BatchEncoding (a mapping); older ones the list of ids
        ids = out["input_ids"] if isinstance(out, Mapping) else out
        if not isinstance(ids, list):
            raise TypeError(f"apply_chat_template gave {type(ids).__name__}, not a list of ids")
        return [int(i) for i in ids]
    parts = [system_prompt] if system_prompt.strip() else []
    parts.extend(m.content for m in messages)
    return [int(i) for i in tokenizer("\n\n".join(parts))["input_ids"]]


def plan_turn(cached: Sequence[int], full: Sequence[int], floor: int | None = None) -> TurnPlan:
    """Where to start stepping ``full`` given the caches hold ``cached``.

    Everything ``full`` shares with the cache is reused, except that at least one id is stepped
    (its logits give the first token). ``floor`` caps the start: regenerate and edit pass the
    replaced turn's own start so the new reply is computed in the same steps as the first one
    (the same greedy tokens, bit for bit).

    Raises:
        ValueError: ``full`` is empty.
    """
    if not full:
        raise ValueError("a turn needs at least one prompt id")
    start = min(common_prefix(cached, full), len(full) - 1)
    if floor is not None:
        start = max(0, min(start, floor))
    return TurnPlan(start, tuple(full[start:]), tuple(full))


def cached_after(plan: TurnPlan, reply_ids: Sequence[int]) -> list[int]:
    """What the caches hold after a reply: the prompt and every reply token but the last (the
    last sampled token was never stepped)."""
    return [*plan.full, *reply_ids[:-1]]


def title_for(prompt: str, width: int = 48) -> str:
    """A conversation's title: the first line of its first prompt, cut to ``width``."""
    line = next((ln.strip() for ln in prompt.splitlines() if ln.strip()), "") or "untitled"
    return line if len(line) <= width else line[: width - 1].rstrip() + "…"
