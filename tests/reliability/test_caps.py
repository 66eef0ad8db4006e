"""Failure table, row 5: each cap exceeded gives RESOURCE_EXHAUSTED naming the cap, with nothing
allocated for the refused request, and the sessions already open go on unaffected."""

from __future__ import annotations

import logging

import pytest

from splitlm.shared.errors import StepRefused, TrunkError

from .helpers import (
    PROMPT,
    Factory,
    Models,
    Split,
    connect,
    prompt_of,
    run_ids,
    sessions_open,
    wait_until,
)

SPLIT = ("--split", "2:4")
log = logging.getLogger(__name__)


def solo(split: Split, prompt: list[int], n: int) -> list[int]:
    pipe = split.pipeline()
    try:
        return run_ids(pipe, prompt, n).token_ids
    finally:
        pipe.close()


def solo_full(split: Split, prompt: list[int], n: int) -> list[int]:
    """The full model here (no daemon, no budget): what a split run must give."""
    from splitlm.shared.generation import LocalPipeline
    from splitlm.shared.models import PartSpec, build_part

    full = split.parts.full
    if full is None:
        b = split.parts.bottom
        full = build_part(b.source, b.family, PartSpec.full(b.num_layers), b.dtype, b.device)
    return run_ids(LocalPipeline(full), prompt, n).token_ids


def test_max_sessions(tiny_models: Models, daemon_factory: Factory) -> None:
    model = tiny_models["llama"]
    d = daemon_factory(model, *SPLIT, "--max-sessions", "4")
    split = connect(d.address, model)
    want = [solo(split, prompt_of(i), 16) for i in range(4)]
    pipes = [split.pipeline() for _ in range(4)]
    firsts = [run_ids(p, prompt_of(i), 8) for i, p in enumerate(pipes)]
    with pytest.raises(TrunkError) as info:
        split.pipeline()
    assert info.value.code == "RESOURCE_EXHAUSTED" and "--max-sessions" in info.value.details
    log.info("cap max_sessions=4, a 5th open: %s: %s", info.value.code, info.value.details)
    # the four open sessions go on as if nothing happened
    for i, (p, first) in enumerate(zip(pipes, firsts)):
        rest = run_ids(p, [first.token_ids[-1]], 8, start_position=len(prompt_of(i)) + 7)
        assert first.token_ids + rest.token_ids == want[i]
    pipes[0].close()
    wait_until(lambda: sessions_open(d.address) == 3, what="a freed slot")
    again = split.pipeline()  # the slot is usable again
    assert run_ids(again, PROMPT, 4).token_ids
    for p in [again, *pipes[1:]]:
        p.close()
    split.close()


def test_max_context(tiny_models: Models, daemon_factory: Factory) -> None:
    model = tiny_models["llama"]
    d = daemon_factory(model, *SPLIT, "--max-context", "32")
    split = connect(d.address, model)
    want = solo(split, prompt_of(1), 10)
    long, other = split.pipeline(), split.pipeline()
    first = run_ids(other, prompt_of(1), 5)
    with pytest.raises(TrunkError) as info:
        run_ids(long, PROMPT, 40)  # 20 + 40 positions > 32
    assert info.value.code == "RESOURCE_EXHAUSTED" and "32" in info.value.details
    log.info("cap max_context=32, position 33: %s: %s", info.value.code, info.value.details)
    rest = run_ids(other, [first.token_ids[-1]], 5, start_position=len(prompt_of(1)) + 4)
    assert first.token_ids + rest.token_ids == want
    other.close()
    long.close()
    split.close()
    wait_until(lambda: sessions_open(d.address) == 0, what="sessions back to 0")
    assert d.proc.poll() is None


def test_max_cache_bytes(tiny_models: Models, daemon_factory: Factory) -> None:
    """All sessions' trunk caches together: the tiny Llama's trunk (2 layers, 2 KV heads of 16,
    float32) costs 512 B per position, so 16 KiB holds 32 positions of buffers in all. The
    refused session stays open: nothing of it changed, and a step that fits runs on it."""
    model = tiny_models["llama"]
    d = daemon_factory(model, *SPLIT, "--max-cache-bytes", "16384")
    split = connect(d.address, model)
    want = solo(split, PROMPT, 10)
    wait_until(lambda: sessions_open(d.address) == 0, what="the solo session freed")
    first, second = split.pipeline(), split.pipeline()
    head = run_ids(first, PROMPT, 5)  # 24 positions in use, 26 allocated (20, then half what is left)
    session_id = second.session.session_id
    with pytest.raises(StepRefused) as info:
        run_ids(second, prompt_of(3, 12), 2)  # 12 more would make 38 > 32
    assert info.value.code == "RESOURCE_EXHAUSTED" and "--max-cache-bytes" in info.value.details
    log.info("cap max_cache_bytes=16384, 38 positions: %s: %s", info.value.code, info.value.details)
    assert sessions_open(d.address) == 2  # the refused session is still open
    short = run_ids(second, prompt_of(3, 4), 1)  # 4 positions fit: the same session serves them
    assert short.token_ids == [solo_full(split, prompt_of(3, 4), 1)[0]]
    assert second.session.session_id == session_id
    second.close()
    wait_until(lambda: sessions_open(d.address) == 1, what="the second session freed")
    tail = run_ids(first, [head.token_ids[-1]], 5, start_position=len(PROMPT) + 4)  # up to 29: fits
    assert head.token_ids + tail.token_ids == want
    for p in (first, second):
        p.close()
    split.close()
    wait_until(lambda: sessions_open(d.address) == 0, what="sessions back to 0")
    assert d.proc.poll() is None
