"""``splitlm generate --batch FILE``: many prompts from a JSONL file, run concurrently, one JSON
result a line, in input order.

Each input line is a JSON object: ``prompt`` (a string) or ``messages`` (a list of
``{"role", "content"}``, through the model's chat template), and optionally ``id`` (echoed back),
``max_new_tokens``, ``temperature``, ``top_p``, ``top_k``, ``seed``, ``stop`` (a string or a list)
and ``no_chat``; the command's own flags are the defaults. A line that is not such an object
gets ``{"line": N, "id": ..., "error": "..."}`` and the others still run. Blank lines are skipped.

Concurrency: ``lanes`` threads, each with its own drafter, take prompts in input order; each
prompt runs in its own pipeline (for the split: its own trunk session), so a daemon started with
``--batch`` batches the decode steps of the prompts in flight. The client's parts are shared
under one lock (``shared.serialised``). Results are written as soon as every earlier line's is,
so the output streams in input order.

This module is the batch's engine inside the CLI face; the CLI (``tui.cli``) loads the model and
builds the lanes.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

from ..shared.errors import SplitlmError, UsageError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..shared.draft.base import Drafter
    from ..shared.generation import GenerationResult, GenerationSettings, Pipeline, TokenEvent

log = logging.getLogger(__name__)

STDIN = "-"
"""``--batch -``: the prompts come from standard input."""

LINE_KEYS = (
    "prompt", "messages", "id", "max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop",
    "no_chat",
)
"""The keys an input line may have; any other is refused (a typo such as ``max_tokens`` would
otherwise be silently ignored)."""


@dataclass(frozen=True)
class Job:
    """One valid input line.

    Attributes:
        line: its 1-based line number in the input.
        id: the line's ``id`` (None when it had none).
        settings: the command's defaults with the line's own values.
        prompt: the prompt, or None when the line gives ``messages``.
        messages: the conversation, for the chat template.
        chat: apply the chat template to ``prompt`` (not ``no_chat``).
    """

    line: int
    id: Any
    settings: GenerationSettings
    prompt: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    chat: bool = True


@dataclass(frozen=True)
class BadLine:
    """An input line that cannot run, with why (its result is ``{"line", "id", "error"}``)."""

    line: int
    error: str
    id: Any = None


def read_source(source: str | Path) -> list[tuple[int, str]]:
    """The non-blank lines of ``source`` (a path, or ``-`` for standard input) with their 1-based
    line numbers.

    Raises:
        UsageError: the file does not exist or cannot be read, is not UTF-8, or holds no line.
    """
    name = str(source)
    try:
        text = sys.stdin.read() if name == STDIN else Path(name).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"--batch {name}: no such file") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"--batch {name}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UsageError(f"--batch {name}: cannot read it: {e.strerror or e}") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        where = "standard input" if name == STDIN else name
        raise UsageError(f"--batch {where}: no prompts (the file is empty; one JSON object a line)")
    return lines


def parse_line(number: int, text: str, defaults: GenerationSettings, chat: bool) -> Job | BadLine:
    """One input line as a ``Job``, or a ``BadLine`` saying what is wrong with it."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return BadLine(number, f"not valid JSON: {e.msg} at column {e.colno}")
    if not isinstance(obj, dict):
        return BadLine(number, f"expected a JSON object, got {type(obj).__name__}")
    line_id = obj.get("id")
    try:
        return _job(number, obj, defaults, chat)
    except ValueError as e:
        return BadLine(number, str(e), line_id)


def _job(number: int, obj: dict[str, Any], defaults: GenerationSettings, chat: bool) -> Job:
    """Raises ValueError with the message for the line's result."""
    from ..shared.generation import GenerationSettings
    from ..shared.sampling import SamplingSettings

    unknown = sorted(set(obj) - set(LINE_KEYS))
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r}; a line may have: {', '.join(LINE_KEYS)}")
    prompt, messages = obj.get("prompt"), obj.get("messages")
    if prompt is None and messages is None:
        raise ValueError('missing "prompt" (a string) or "messages"')
    if prompt is not None and messages is not None:
        raise ValueError('give "prompt" or "messages", not both')
    if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
        raise ValueError('"prompt" must be a non-empty string')
    if messages is not None:
        messages = _messages(messages)
    no_chat = obj.get("no_chat", not chat)
    if not isinstance(no_chat, bool):
        raise ValueError(f'"no_chat" must be true or false, got {json.dumps(no_chat)}')
    if messages is not None and no_chat:
        raise ValueError('"messages" needs the chat template; "no_chat" applies to "prompt" only')
    s, sm = defaults, defaults.sampling
    sampling = SamplingSettings(
        temperature=_number(obj, "temperature", sm.temperature, 0.0, None),
        top_k=_integer(obj, "top_k", sm.top_k, 0),
        top_p=_number(obj, "top_p", sm.top_p, 0.0, 1.0, open_low=True),
        seed=_integer(obj, "seed", sm.seed, 0) if "seed" in obj else sm.seed,
    )
    settings = GenerationSettings(
        max_new_tokens=_integer(obj, "max_new_tokens", s.max_new_tokens, 1),
        stop=_stop(obj["stop"]) if "stop" in obj else s.stop,
        sampling=sampling,
    )
    return Job(number, obj.get("id"), settings, prompt, messages, not no_chat)


def _messages(raw: object) -> tuple[dict[str, str], ...]:
    if not isinstance(raw, list) or not raw:
        raise ValueError('"messages" must be a non-empty list of {"role": ..., "content": ...}')
    for i, m in enumerate(raw):
        if not (isinstance(m, dict) and set(m) == {"role", "content"}
                and isinstance(m["role"], str) and isinstance(m["content"], str)):
            raise ValueError(f'"messages"[{i}] must be {{"role": string, "content": string}}')
    return tuple(raw)


def _number(obj: Mapping[str, Any], key: str, default: float, low: float, high: float | None,
            open_low: bool = False) -> float:
    value = obj.get(key, default)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    if ok and (value < low or (open_low and value == low) or (high is not None and value > high)):
        ok = False
    if not ok:
        span = f"in ({low:g}, {high:g}]" if open_low and high is not None else f">= {low:g}"
        raise ValueError(f'"{key}" must be a number {span}, got {json.dumps(value)}')
    return float(value)


def _integer(obj: Mapping[str, Any], key: str, default: int | None, low: int) -> Any:
    value = obj.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f'"{key}" must be an integer >= {low}, got {json.dumps(value)}')
    return value


def _stop(raw: object) -> tuple[str, ...]:
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise ValueError(f'"stop" must be a non-empty string or a list of them, got {json.dumps(raw)}')
    return tuple(items)


def job_ids(job: Job, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The prompt's token ids, as ``splitlm generate`` makes them for the same prompt.

    Raises:
        ValueError: ``messages`` for a model without a chat template.
    """
    from ..shared.generation import prompt_ids

    if job.prompt is not None:
        return prompt_ids(tokenizer, job.prompt, chat=job.chat)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError('this model has no chat template: give "prompt" (raw text) instead of "messages"')
    out = tokenizer.apply_chat_template(list(job.messages or ()), add_generation_prompt=True, tokenize=True)
    if isinstance(out, Mapping):  # a BatchEncoding from newer transformers
        out = out["input_ids"]
    return [int(i) for i in cast("list[int]", out)]


class Output:
    """Where results go: standard output line by line, or a file written whole or not at all
    (a temporary file beside it, renamed over it by ``commit``)."""

    def __init__(self, path: Path | None) -> None:
        """Raises UsageError: the file's folder does not exist or is not writable."""
        self.path = path
        self._tmp: str | None = None
        self._fh: IO[str] = sys.stdout
        if path is not None:
            folder = path.parent if str(path.parent) else Path(".")
            if path.is_dir():
                raise UsageError(f"--output {path} is a directory")
            try:
                fd, self._tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
            except OSError as e:
                raise UsageError(f"--output {path}: cannot write there: {e.strerror or e}") from None
            os.chmod(self._tmp, _file_mode(path))
            self._fh = os.fdopen(fd, "w", encoding="utf-8")

    def write(self, result: Mapping[str, Any]) -> None:
        self._fh.write(json.dumps(result) + "\n")
        self._fh.flush()

    def commit(self) -> None:
        if self._tmp is not None and self.path is not None:
            self._fh.close()
            os.replace(self._tmp, self.path)
            self._tmp = None

    def discard(self) -> None:
        """Drop a file never committed (an interrupted or failed run): nothing half-written."""
        if self._tmp is not None:
            self._fh.close()
            os.unlink(self._tmp)
            self._tmp = None


def _file_mode(path: Path) -> int:
    """The mode ``path`` has, or a new file would get (``mkstemp`` makes its file 0600)."""
    try:
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)  # read it: only setting it returns it; this runs before any thread
        os.umask(umask)
        return 0o666 & ~umask


class Progress:
    """One self-rewriting status line on a terminal's stderr; silent when stderr is not one."""

    def __init__(self, total: int, stream: IO[str] | None = None) -> None:
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.on = self.stream.isatty()
        self.t0 = time.perf_counter()
        self._width = 0

    def show(self, done: int, failed: int, running: int, tokens: int) -> None:
        if not self.on:
            return
        elapsed = time.perf_counter() - self.t0
        text = (f"batch: {done}/{self.total} done, {failed} failed, {running} running, {tokens} tokens, "
                f"{tokens / elapsed if elapsed > 0 else 0.0:.1f} tokens/s, {elapsed:.0f} s")
        self.stream.write("\r" + text.ljust(self._width))
        self.stream.flush()
        self._width = len(text)

    def close(self) -> None:
        if self.on and self._width:
            self.stream.write("\n")
            self.stream.flush()


@dataclass(frozen=True)
class Lane:
    """What one worker thread runs its prompts with.

    Attributes:
        open: a fresh pipeline for one prompt (for the split: a new trunk session).
        drafter: this lane's own drafter (a drafter follows one reply at a time), or None.
    """

    open: Callable[[], Pipeline]
    drafter: Drafter | None = None


@dataclass(frozen=True)
class BatchSummary:
    """How a batch went: ``lines`` results written, ``failed`` of them errors."""

    lines: int
    failed: int
    tokens: int
    seconds: float


class _State:
    """What the worker threads and the writing thread share, under one condition."""

    def __init__(self, n: int) -> None:
        self.cond = threading.Condition()
        self.results: list[dict[str, Any] | None] = [None] * n
        self.running = 0
        self.tokens = 0
        self.failed = 0


def run_batch(
    items: Sequence[tuple[Job, list[int]] | BadLine],
    lanes: Sequence[Lane],
    tokenizer: PreTrainedTokenizerBase,
    eos_ids: Sequence[int],
    to_json: Callable[[GenerationResult], dict[str, Any]],
    output: Output,
    progress: Progress,
    draft_max: int = 8,
    draft_link: float | None = None,
) -> BatchSummary:
    """Run every job on ``lanes`` (one thread each) and write each line's result in input order.

    Called on the main thread, which only writes results and the progress line. A Ctrl-C there
    stops every reply at its next step (``finish_reason`` ``cancelled``) and is re-raised once
    the threads have stopped; the caller then discards the output.

    Returns:
        The summary; ``failed`` counts bad lines and replies that failed.
    """
    from ..shared.generation import generate

    st = _State(len(items))
    queue = deque(i for i, item in enumerate(items) if not isinstance(item, BadLine))
    for i, item in enumerate(items):
        if isinstance(item, BadLine):
            st.results[i] = _error(item.line, item.id, item.error)
            st.failed += 1
    stop = threading.Event()

    def run_one(job: Job, ids: list[int], lane: Lane) -> dict[str, Any]:
        def on_token(ev: TokenEvent) -> None:
            with st.cond:
                st.tokens += 1

        pipe = lane.open()
        try:
            res = generate(pipe, tokenizer, ids, job.settings, eos_ids, on_token=on_token,
                           should_stop=stop.is_set, drafter=lane.drafter, draft_max=draft_max,
                           draft_link=draft_link)
        finally:
            pipe.close()
        return {"line": job.line, "id": job.id, **to_json(res)}

    def work(lane: Lane) -> None:
        while True:
            with st.cond:
                if not queue or stop.is_set():
                    return
                i = queue.popleft()
                st.running += 1
            job, ids = cast("tuple[Job, list[int]]", items[i])
            try:
                result = run_one(job, ids, lane)
            except SplitlmError as e:
                result = _error(job.line, job.id, str(e))
            except Exception as e:  # noqa: BLE001 - a bug in one reply: the others still run
                log.exception("line %d failed", job.line)
                result = _error(job.line, job.id, f"internal error: {type(e).__name__}: {e}")
            with st.cond:
                st.results[i] = result
                st.running -= 1
                st.failed += "error" in result
                st.cond.notify_all()

    threads = [threading.Thread(target=work, args=(lane,), name=f"batch-{k}", daemon=True)
               for k, lane in enumerate(lanes)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    written = 0
    try:
        while written < len(items):
            with st.cond:
                if st.results[written] is None:
                    st.cond.wait(timeout=0.25)
                ready: list[dict[str, Any]] = []
                for r in st.results[written:]:
                    if r is None:
                        break
                    ready.append(r)
                counts = (st.failed, st.running, st.tokens)
                if not ready and not any(t.is_alive() for t in threads):
                    raise RuntimeError(f"line {_line_of(items[written])} was never run")  # a bug
            for r in ready:
                output.write(r)
            written += len(ready)
            progress.show(sum(r is not None for r in st.results), *counts)
    except BaseException:
        stop.set()
        for t in threads:
            t.join()
        raise
    finally:
        progress.close()
    for t in threads:
        t.join()
    return BatchSummary(len(items), st.failed, st.tokens, time.perf_counter() - t0)


def _error(line: int, line_id: Any, error: str) -> dict[str, Any]:
    return {"line": line, "id": line_id, "error": error}


def _line_of(item: tuple[Job, list[int]] | BadLine) -> int:
    return item.line if isinstance(item, BadLine) else item[0].line


def prepare_items(
    lines: Sequence[tuple[int, str]], defaults: GenerationSettings, chat: bool,
    tokenizer: PreTrainedTokenizerBase,
) -> list[tuple[Job, list[int]] | BadLine]:
    """Every input line parsed and tokenized, here on the calling thread (a fast tokenizer is
    best not shared between threads while it encodes)."""
    out: list[tuple[Job, list[int]] | BadLine] = []
    for number, text in lines:
        item = parse_line(number, text, defaults, chat)
        if isinstance(item, Job):
            try:
                out.append((item, job_ids(item, tokenizer)))
            except (ValueError, SplitlmError) as e:
                out.append(BadLine(item.line, str(e), item.id))
            continue
        out.append(item)
    return out

