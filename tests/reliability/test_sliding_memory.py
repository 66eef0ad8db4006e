"""Sliding-window layers keep bounded memory, and rollbacks and failover stay token-exact.

A tiny Gemma 2 / Gemma 3 (window 6) with a 1024-position context generates past
``W - 1 + ROLLBACK_DEPTH`` through a real daemon: the sliding layers' buffers stop growing (the
Gemma 3 trunk, layers 2-3, is all sliding: the daemon's whole cache is flat, read from ``Info``).
Then a rollback within the kept depth, and one below it (the daemon would refuse it; the client
re-prefills from its token ids), each continue exactly as the full model in this process given
the same calls, and as transformers' own ``generate`` given the same prompt.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
import torch

from splitlm.shared.cache import ROLLBACK_DEPTH, SlidingLayer
from splitlm.shared.errors import TrunkError
from splitlm.shared.generation import LocalPipeline, SplitPipeline
from splitlm.shared.models import PartSpec, build_part, family_for, resolve
from tests.conftest import SLIDING_WINDOW, Daemon, reference_generate, save_tiny, start_daemon

from .helpers import FAST_RETRY, Factory, TokenEvent, connect, prompt_of, run_ids

SPLIT = ("--split", "2:4")
KEEP = SLIDING_WINDOW - 1 + ROLLBACK_DEPTH
"""Positions a sliding layer keeps; past about this many the memory must stop growing."""
log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def long_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny Gemma 2 and 3 as in conftest, with room for 1024 positions."""
    root = tmp_path_factory.mktemp("long")
    return {kind: save_tiny(kind, root / kind, max_position_embeddings=1024) for kind in ("gemma2", "gemma3")}


def full_pipeline(model: Path) -> LocalPipeline:
    src = resolve(str(model))
    part = build_part(src, family_for(src.config), PartSpec.full(6), torch.float32, torch.device("cpu"))
    return LocalPipeline(part)


def sliding_bytes(pipe: SplitPipeline) -> list[int]:
    """Allocated bytes of each sliding layer of the client's bottom and top caches."""
    out = []
    for cache in (pipe.bottom_cache, pipe.top_cache):
        for layer in cache.layers[cache.start : cache.end]:
            if isinstance(layer, SlidingLayer):
                out.append(layer.allocated_bytes())
    return out


@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
def test_memory_flat_past_the_window_and_rollbacks_exact(
    long_models: dict[str, Path], daemon_factory: Factory, kind: str
) -> None:
    model = long_models[kind]
    d = daemon_factory(model, *SPLIT)
    split = connect(d.address, model)
    info = split.client.info()
    assert info.limits.rollback_depth == ROLLBACK_DEPTH
    pipe, full = split.pipeline(), full_pipeline(model)
    prompt, n = prompt_of(1, 20), KEEP + 140  # past 1.25 x KEEP, where the buffers stop growing
    trunk: dict[int, int] = {}
    client: dict[int, list[int]] = {}

    def watch(ev: TokenEvent) -> None:
        if ev.index in (KEEP + 60, n - 1):
            trunk[ev.index] = split.client.info().cache_allocated_bytes
            client[ev.index] = sliding_bytes(pipe)

    res = run_ids(pipe, prompt, n, on_token=watch)
    assert res.token_ids == run_ids(full, prompt, n).token_ids
    assert res.token_ids == reference_generate(model, prompt, n)
    early, late = KEEP + 60, n - 1
    assert client[early] == client[late] and client[late], "the client's sliding layers kept growing"
    bound = 2 * int(1.25 * KEEP + 1) * 2 * 2 * 16 * 4  # 2 layers x positions x K,V x 2 heads x 16 x fp32
    if kind == "gemma3":  # trunk layers 2-3 are both sliding: the daemon's whole cache is flat
        assert trunk[early] == trunk[late] <= bound, trunk
    log.info("%s: %d positions, trunk cache %s B, client sliding layers %s B",
             kind, len(prompt) + n, trunk, client[late])

    ids = prompt + res.token_ids[:-1]  # what the caches hold
    assert pipe.rollback_floor == full.cache.rollback_floor == len(ids) - ROLLBACK_DEPTH
    # within the depth: the caches roll back, no re-prefill
    r1, x = len(ids) - 100, 7
    a = run_ids(pipe, [x], 20, start_position=r1).token_ids
    assert a == run_ids(full, [x], 20, start_position=r1).token_ids
    assert a == reference_generate(model, ids[:r1] + [x], 20)
    # below the floor: the client re-prefills ids[:r2] + [y] from position 0
    r2, y = 30, 11
    assert pipe.rollback_floor > r2
    before = split.client.info().cache_allocated_bytes
    b = run_ids(pipe, [y], 20, start_position=r2).token_ids
    assert b == run_ids(full, [y], 20, start_position=r2).token_ids
    assert b == reference_generate(model, ids[:r2] + [y], 20)
    assert split.client.info().cache_allocated_bytes <= before  # the buffers are reused
    assert pipe.rollback_floor == 0  # 50 positions: nothing dropped yet
    # the daemon itself refuses a step below its floor, with the way out in the message
    run_ids(pipe, [y], KEEP + 20, start_position=r2)
    with pytest.raises(TrunkError) as refused:
        pipe.session.step(torch.randn(1, 1, 64), 5)
    assert refused.value.code == "OUT_OF_RANGE" and "re-prefill from position 0" in refused.value.details
    pipe.close()
    split.close()
    assert d.proc.poll() is None


def test_failover_past_the_window_then_a_deep_rollback(
    long_models: dict[str, Path], daemon_factory: Factory, tmp_path: Path
) -> None:
    """The daemon is killed after the sliding layers dropped history: the replay rebuilds the same
    bounded cache and the same floor; a rollback below it then re-prefills, still exact."""
    model = long_models["gemma2"]
    d = daemon_factory(model, *SPLIT)
    split = connect(d.address, model)
    prompt, n, kill_at = prompt_of(2, 20), KEEP + 40, KEEP + 10
    full = full_pipeline(model)
    want = run_ids(full, prompt, n).token_ids
    box: dict[str, Daemon] = {}
    restarts: list[threading.Thread] = []

    def restart() -> None:
        time.sleep(0.5)
        box["daemon"] = start_daemon(model, d.address, tmp_path / "restarted.log", *SPLIT)

    def kill(ev: TokenEvent) -> None:
        if ev.index == kill_at:
            d.proc.kill()
            d.proc.wait()
            restarts.append(threading.Thread(target=restart, daemon=True))
            restarts[0].start()

    pipe = split.pipeline(FAST_RETRY)
    try:
        got = run_ids(pipe, prompt, n, on_token=kill).token_ids
        assert restarts and pipe.session.resumes, "the daemon was not restarted"
        assert got == want
        ids = prompt + got[:-1]
        assert pipe.session.rollback_floor == len(ids) - ROLLBACK_DEPTH  # rebuilt by the replay
        again = run_ids(pipe, [9], 15, start_position=12).token_ids
        assert again == run_ids(full, [9], 15, start_position=12).token_ids
        assert again == reference_generate(model, ids[:12] + [9], 15)
    finally:
        pipe.close()
        split.close()
        for t in restarts:
            t.join()
        if "daemon" in box:
            box["daemon"].stop()
