"""Training text for ``splitlm distill``: read ``--data``, or have the teacher continue prompts.

Two kinds of input, both checked before anything is written:

- texts (a plain text file, or JSONL lines with a ``text`` field): trained on as they are;
- prompts (JSONL lines with a ``prompt`` field, or the shipped ``prompts.jsonl`` when there is no
  ``--data``): each is put in the model's chat template and the teacher's own continuation is
  generated here, so the student learns what the served model says after such prompts.

The token ids of every sequence are then joined (an end token between two) and cut into blocks of
``--seq-len`` tokens; a seeded share of the blocks is held out for evaluation.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...shared.errors import UsageError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

EVAL_SHARE = 0.1
"""Share of the blocks held out for evaluation (at least one)."""
GEN_BATCH = 8
"""Prompts the teacher continues at once."""


@dataclass(frozen=True)
class Corpus:
    """What ``--data`` (or the shipped set) holds: texts to train on, or prompts to continue.

    Attributes:
        texts: training texts.
        prompts: prompts for the teacher.
        source: where they came from, for the summary.
    """

    texts: tuple[str, ...]
    prompts: tuple[str, ...]
    source: str


def shipped_prompts() -> Corpus:
    """The prompt set shipped with splitlm: chat questions, summarise/edit a given text, code."""
    text = resources.files(__package__).joinpath("prompts.jsonl").read_text(encoding="utf-8")
    return Corpus((), tuple(json.loads(line)["prompt"] for line in text.splitlines() if line.strip()), "shipped prompts")


def read_corpus(path: Path) -> Corpus:
    """Read ``--data``: JSONL (``.jsonl``/``.json`` or a first line that is a JSON object) with a
    ``text`` or ``prompt`` field per line, else plain text (one training text).

    Raises:
        UsageError: no such file, not text (binary, not UTF-8), empty, or a JSONL line without
            a string ``text``/``prompt`` (named by its line number).
    """
    if not path.is_file():
        raise UsageError(f"--data {path}: no such file")
    raw = path.read_bytes()
    if b"\x00" in raw[:65536]:
        raise UsageError(f"--data {path} is not text (it holds NUL bytes: a binary file?)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"--data {path} is not UTF-8 text (byte {e.start} is not valid)") from None
    if not text.strip():
        raise UsageError(f"--data {path} is empty: it holds no text to train on")
    first = next(line for line in text.splitlines() if line.strip()).lstrip()
    if path.suffix.lower() not in (".jsonl", ".json") and not first.startswith("{"):
        return Corpus((text,), (), str(path))
    texts: list[str] = []
    prompts: list[str] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"--data {path} line {n}: not JSON ({e.msg})") from None
        value = row.get("text") if isinstance(row, dict) else None
        target = texts
        if value is None and isinstance(row, dict):
            value, target = row.get("prompt"), prompts
        if not isinstance(value, str) or not value.strip():
            raise UsageError(f"--data {path} line {n}: needs a non-empty string field \"text\" or \"prompt\"")
        target.append(value)
    return Corpus(tuple(texts), tuple(prompts), str(path))


def text_ids(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    return [[int(i) for i in tokenizer(t)["input_ids"]] for t in texts]


def continue_prompts(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    eos_ids: Sequence[int],
    new_tokens: int,
    temperature: float,
    seed: int,
    on_batch: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """Each prompt (chat template when the model has one) followed by the teacher's continuation.

    Batched with left padding through transformers' own ``generate`` on the full model (a
    training set needs the teacher's text, not split-exact steps; batching makes it several
    times faster on a CPU).
    """
    import torch

    from ...shared.generation import prompt_ids

    pad = tokenizer.pad_token_id
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    max_pos = int(getattr(model.config, "max_position_embeddings", 0) or getattr(model.config, "n_positions", 0) or 1 << 30)
    encoded = [prompt_ids(tokenizer, p, chat=True)[-(max_pos - new_tokens) :] for p in prompts]
    gen = torch.Generator().manual_seed(seed)
    out: list[list[int]] = []
    eos = set(eos_ids)
    device = next(model.parameters()).device
    for i in range(0, len(encoded), GEN_BATCH):
        batch = encoded[i : i + GEN_BATCH]
        width = max(len(b) for b in batch)
        ids = torch.tensor([[pad] * (width - len(b)) + b for b in batch], device=device)  # (B, width)
        mask = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch], device=device)
        kwargs: dict[str, Any] = {"do_sample": False}
        if temperature > 0:
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            kwargs = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        with torch.inference_mode():
            gen_out = model.generate(  # type: ignore[operator]  # a PreTrainedModel
                input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, pad_token_id=pad,
                eos_token_id=list(eos_ids) or None, **kwargs,
            )
        for b, row in zip(batch, gen_out[:, width:].tolist()):
            cont: list[int] = []
            for t in row:
                cont.append(int(t))
                if t in eos:
                    break
            out.append(b + cont)
        if on_batch is not None:
            on_batch(len(batch))
    return out


def blocks_of(sequences: Sequence[Sequence[int]], seq_len: int, separator: int | None) -> list[list[int]]:
    """The sequences joined (``separator`` between two) and cut into blocks of ``seq_len``
    (the tail shorter than a block is dropped)."""
    stream: list[int] = []
    for s in sequences:
        if stream and separator is not None and stream[-1] != separator:
            stream.append(separator)
        stream.extend(s)
    return [stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]


def split_blocks(blocks: list[list[int]], seed: int, source: str) -> tuple[list[list[int]], list[list[int]]]:
    """(train, eval): a seeded shuffle, then ``EVAL_SHARE`` (at least one block) held out.

    Raises:
        UsageError: fewer than two blocks (nothing to train on, or nothing to evaluate).
    """
    import random

    if len(blocks) < 2:
        raise UsageError(
            f"--data {source} makes {len(blocks)} block(s) of --seq-len tokens; at least 2 are needed (one "
            "to train on, one to evaluate): give more text or a smaller --seq-len"
        )
    order = list(range(len(blocks)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(blocks) * EVAL_SHARE))
    return [blocks[i] for i in order[n_eval:]], [blocks[i] for i in order[:n_eval]]
