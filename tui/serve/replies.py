"""OpenAI's reply objects (completions, chunks, logprobs, usage) from the engine's results.

Pure functions of their arguments, called on the event loop; token text comes from the
tokenizer passed in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ...shared.generation import GenerationResult, TokenLogprobs

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop"}
"""The engine's finish reasons as OpenAI's: an end token or a stop string is ``stop``."""


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _token_text(tokenizer: PreTrainedTokenizerBase, token: int) -> str:
    text = tokenizer.decode([token], skip_special_tokens=False)
    return text if isinstance(text, str) else ""


def chat_logprob(tokenizer: PreTrainedTokenizerBase, token: int, lp: TokenLogprobs) -> dict[str, Any]:
    """One entry of a chat reply's ``logprobs.content``."""

    def entry(t: int, value: float) -> dict[str, Any]:
        text = _token_text(tokenizer, t)
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

    return {**entry(token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}


def completion_logprobs(tokenizer: PreTrainedTokenizerBase, tokens: Sequence[int],
                        lps: Sequence[TokenLogprobs], offset: int = 0) -> dict[str, Any]:
    """A completion's (legacy) ``logprobs`` object for ``tokens``; ``offset``: the text already
    sent before them (streaming)."""
    texts = [_token_text(tokenizer, t) for t in tokens]
    offsets, at = [], offset
    for text in texts:
        offsets.append(at)
        at += len(text)
    return {
        "tokens": texts,
        "token_logprobs": [lp.logprob for lp in lps],
        "top_logprobs": [{_token_text(tokenizer, t): v for t, v in lp.top} for lp in lps],
        "text_offset": offsets,
    }


def chat_completion(rid: str, created: int, model: str, res: GenerationResult, logprobs: list[Any] | None,
                    prompt_tokens: int) -> dict[str, Any]:
    return {
        "id": rid, "object": "chat.completion", "created": created, "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": res.text},
            "logprobs": None if logprobs is None else {"content": logprobs},
            "finish_reason": FINISH[res.finish_reason],
        }],
        "usage": usage(prompt_tokens, len(res.token_ids)),
    }


def chat_chunk(rid: str, created: int, model: str, delta: dict[str, Any], finish: str | None = None,
               logprobs: list[Any] | None = None) -> dict[str, Any]:
    return {
        "id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": 0, "delta": delta,
                     "logprobs": None if logprobs is None else {"content": logprobs},
                     "finish_reason": finish}],
    }


def text_completion(rid: str, created: int, model: str, text: str, finish: str | None,
                    logprobs: dict[str, Any] | None, use: dict[str, int] | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": rid, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}],
    }
    if use is not None:
        out["usage"] = use
    return out


def usage_chunk(rid: str, created: int, model: str, kind: str, use: dict[str, int]) -> dict[str, Any]:
    """The last chunk of a stream with ``stream_options.include_usage``: no choices."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": use}
