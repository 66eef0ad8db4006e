"""Prompts of exact token lengths, the same on every run.

With a tokenizer the prompt is the start of a fixed English text (repeated as often as the length
needs), tokenized once and cut to the length: a cut at a token boundary, so the ids are exactly
what the model sees. Without one (a weights-only directory, such as the tests' tiny models) the
ids follow a fixed arithmetic sequence over the vocabulary.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

FIXED_TEXT = (
    "The history of computing is a history of dividing work. Early machines ran one program at a "
    "time, from a single deck of cards, and every cycle they spent waiting for a reader or a "
    "printer was lost. Time sharing split one processor among many users; networks split one task "
    "among many machines; and the graphics processor split one picture among thousands of small "
    "cores that each shaded a few pixels. A language model can be divided the same way. Its layers "
    "form a pipeline: the first ones turn tokens into vectors, the middle ones refine them, and "
    "the last ones turn them back into a distribution over the next token. Where the middle runs "
    "does not change what it computes, only how long the answer takes to arrive. "
)


class NoText:
    """A stand-in tokenizer for models that ship none: no text, only ids."""

    chat_template = None

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        del ids, skip_special_tokens
        return ""


def prompt_of_length(tokenizer: PreTrainedTokenizerBase | None, vocab_size: int, n: int) -> list[int]:
    """``n`` token ids: the fixed text's first ``n`` tokens, or a fixed sequence without a tokenizer."""
    if tokenizer is None:
        span = max(1, vocab_size - 3)
        return [(37 * i + 11) % span + 3 for i in range(n)]  # ids 0-2 are often special
    per_copy = max(1, len(tokenizer(FIXED_TEXT)["input_ids"]) - 2)
    copies = n // per_copy + 1
    ids: list[int] = []
    while len(ids) < n:
        copies += 1
        ids = [int(i) for i in tokenizer(FIXED_TEXT * copies)["input_ids"]]
    return ids[:n]
