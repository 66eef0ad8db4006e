"""Prompts of exact token lengths, the same on every run.

With a tokenizer the prompt is the start of a fixed English text (repeated as often as the length
needs), tokenized once and cut to the length: a cut at a token boundary, so the ids are exactly
what the model sees. Without one (a weights-only directory, such as the tests' tiny models) the
ids follow a fixed arithmetic sequence over the vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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


# ---- prompt kinds: what the link rows measure drafts on

PROMPT_KINDS = ("grounded", "chat", "code")
"""``grounded``: summarise, quote or edit a text or code given in the prompt (where prompt lookup
finds what to propose); ``chat``: open questions (nothing to copy: only a model draft helps);
``code``: continue a source file (raw text, no chat template)."""

_ESSAY = (
    "The lighthouse at Skerry Point was built in 1858 from granite quarried on the island itself. "
    "Its lamp burned whale oil until 1877, then paraffin, and from 1931 an electric bulb fed by a "
    "diesel generator. Three keepers lived there in rotation, each spending six weeks on the rock "
    "and two ashore. The last keeper, Morag Sinclair, left in 1988 when the light was automated; "
    "she later wrote that the hardest part of the job was not the storms but the silence after "
    "them. Today the tower is run by a trust that opens it to visitors on summer weekends, and "
    "the keepers' cottage has become a small museum of lenses, logbooks and oilskins."
)
_CODE = '''def moving_average(values, window):
    """Return the moving averages of values over the given window."""
    if window <= 0:
        raise ValueError("window must be positive")
    out = []
    total = 0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            out.append(total / window)
    return out
'''


@dataclass(frozen=True)
class KindPrompt:
    """One prompt of a kind.

    Attributes:
        kind: one of ``PROMPT_KINDS``.
        name: a short label for reports.
        text: the prompt.
        chat: wrap it in the model's chat template (False: raw text to continue).
    """

    kind: str
    name: str
    text: str
    chat: bool = True


KIND_PROMPTS: tuple[KindPrompt, ...] = (
    KindPrompt("grounded", "quote", f"Copy the following text exactly, word for word:\n\n{_ESSAY}"),
    KindPrompt("grounded", "edit-code",
               "Rename the function below to rolling_mean and the variable total to running_sum. "
               f"Reply with the whole changed code only.\n\n```python\n{_CODE}```"),
    KindPrompt("grounded", "summarise", f"Summarise this text in a few sentences, reusing its own words:\n\n{_ESSAY}"),
    KindPrompt("chat", "story", "Write a short story about a robot who learns to bake bread."),
    KindPrompt("chat", "explain", "Explain how a refrigerator keeps food cold, for a ten-year-old."),
    KindPrompt("chat", "advice", "What are some good habits for learning a new language?"),
    KindPrompt("code", "csv", "import csv\n\n\ndef read_rows(path):\n    \"\"\"Read a CSV file and return its rows as dicts.\"\"\"\n", chat=False),
    KindPrompt("code", "stack", "class Stack:\n    \"\"\"A last-in, first-out stack.\"\"\"\n\n    def __init__(self):\n", chat=False),
    KindPrompt("code", "fib", "def fibonacci(n):\n    \"\"\"Return the first n Fibonacci numbers as a list.\"\"\"\n", chat=False),
)
"""Three prompts per kind; ``--prompts N`` takes the first N of each kind."""


def kind_prompts(kinds: Sequence[str], per_kind: int) -> list[KindPrompt]:
    """The first ``per_kind`` prompts of each kind in ``kinds``, kinds in the order given."""
    return [p for k in kinds for p in [q for q in KIND_PROMPTS if q.kind == k][:per_kind]]


def kind_prompt_ids(prompt: KindPrompt, tokenizer: PreTrainedTokenizerBase | None, vocab_size: int) -> list[int]:
    """The ids of ``prompt``: through the chat template when it asks for one and the model has it;
    without a tokenizer, a fixed id sequence whose length and repetition follow the kind (a
    grounded prompt repeats its first half, so prompt lookup has something to find)."""
    if tokenizer is None:
        n = {"grounded": 48, "chat": 16, "code": 24}.get(prompt.kind, 16)
        base = prompt_of_length(None, vocab_size, n // 2 if prompt.kind == "grounded" else n)
        salt = sum(map(ord, prompt.name)) % 7
        base = [3 + (i + salt) % max(1, vocab_size - 3) for i in base]
        return base + base if prompt.kind == "grounded" else base
    from ...shared.generation import prompt_ids

    return prompt_ids(tokenizer, prompt.text, prompt.chat)
