"""One request's reply: its prompt's token ids, a session from the pool, the shared generation
loop.

``Engine.prompt_ids`` runs on the event loop (it only tokenizes); ``Engine.reply`` blocks and runs
on a worker thread, one per request in flight. The client's parts are shared by every request
under one lock (``shared.serialised``), while their trunk steps overlap in the daemon, which
batches them when started with ``--batch``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from .protocol import ApiError, ApiRequest
from .sessions import PoolClosed, SessionPool

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ...shared.generation import GenerationResult, TokenEvent
    from .metrics import GatewayMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reply:
    """A finished reply with what the gateway needs besides the result.

    Attributes:
        result: the generation loop's result (text, token ids, finish reason, timings).
        prompt_tokens: the prompt's length (``usage``).
        reused: prompt tokens a kept session already held (not stepped).
    """

    result: GenerationResult
    prompt_tokens: int
    reused: int


class Engine:
    """What every request shares: the tokenizer, the end tokens, the session pool, limits.

    Args:
        tokenizer: the model's.
        eos_ids: tokens that end a reply.
        model_id: what ``/v1/models`` lists.
        pool: the trunk sessions.
        max_context: positions a session may hold (the daemon's limit).
        metrics: the gateway's counters.
        draft_max: ``--draft-max``, for sessions with a drafter.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos_ids: Sequence[int], model_id: str,
                 pool: SessionPool, max_context: int, metrics: GatewayMetrics, draft_max: int = 8) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = list(eos_ids)
        self.model_id = model_id
        self.pool = pool
        self.max_context = max_context
        self.metrics = metrics
        self.draft_max = draft_max
        self.created = int(time.time())

    def prompt_ids(self, req: ApiRequest) -> list[int]:
        """The request's prompt as token ids: the chat template for ``messages`` (as
        ``splitlm generate`` makes a one-turn prompt), the raw text for a completion.

        Raises:
            ApiError: no chat template for a chat request; a prompt longer than the context.
        """
        tok = self.tokenizer
        if req.kind == "chat":
            if not getattr(tok, "chat_template", None):
                raise ApiError(400, "this model has no chat template: use /v1/completions with a raw prompt",
                               param="messages", code="no_chat_template")
            out = tok.apply_chat_template(list(req.messages), add_generation_prompt=True, tokenize=True)
            if isinstance(out, Mapping):  # a BatchEncoding from newer transformers
                out = out["input_ids"]
            ids = [int(i) for i in cast("list[int]", out)]
        else:
            ids = [int(i) for i in tok(req.prompt)["input_ids"]]
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        if len(ids) >= self.max_context:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; the trunk holds at most {self.max_context} "
                           "positions per session (prompt and reply)", param="messages" if req.kind == "chat"
                           else "prompt", code="context_length_exceeded")
        return ids

    def reply(self, req: ApiRequest, ids: list[int], on_token: Callable[[TokenEvent], None] | None,
              should_stop: Callable[[], bool]) -> Reply:
        """Generate the reply to ``ids`` on a pooled session (worker thread; blocks).

        The session is given back however the reply ends: kept for the next turn when its
        caches are consistent (done, stopped, or cancelled between steps), closed after an
        error (the daemon then frees its cache).

        Raises:
            PoolClosed: shutting down, or ``should_stop`` while waiting for a session.
            SplitlmError: the trunk failed (failover gave up, refused a step).
        """
        import dataclasses

        from ...shared.generation import generate

        settings = req.settings
        room = self.max_context - len(ids)
        if settings.max_new_tokens > room:
            settings = dataclasses.replace(settings, max_new_tokens=room)
        lease = self.pool.acquire(ids, should_stop)
        keep = False
        try:
            s = lease.session
            res = generate(s.pipeline, self.tokenizer, ids[lease.start:], settings, self.eos_ids,
                           on_token=on_token, should_stop=should_stop, start_position=lease.start,
                           drafter=s.drafter, draft_max=self.draft_max, history=ids[: lease.start],
                           logprobs=req.logprobs)
            keep = True
        finally:
            self.pool.release(lease.session, keep)
        res.prompt_ids = list(ids)
        self.metrics.prompt_tokens.inc(len(ids))
        self.metrics.completion_tokens.inc(len(res.token_ids))
        self.metrics.stepped.inc(len(ids) - lease.start)
        log.info("%s: %d prompt tokens (%d kept in the trunk), %d generated, %s", req.kind, len(ids),
                 lease.start, len(res.token_ids), res.finish_reason)
        return Reply(res, len(ids), lease.start)


__all__ = ["Engine", "PoolClosed", "Reply"]


def bytes_per_position(config: Any, trunk_layers: int, client_layers: int, trunk_bytes: int,
                       hidden_bytes: int) -> int:
    """Cache bytes one position costs a kept session: keys and values of every layer (the
    trunk's in the daemon at ``trunk_bytes`` an element, the bottom's and top's here at 4), and
    the hidden state failover records per position (``hidden_bytes`` an element)."""
    from ...shared.partition.cost import attention_shape

    _, kv, head_dim = attention_shape(config)
    hidden = int(getattr(config, "hidden_size", None) or config.n_embd)
    per_layer = 2 * kv * head_dim
    return per_layer * (trunk_layers * trunk_bytes + client_layers * 4) + hidden * hidden_bytes
