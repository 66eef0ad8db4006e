"""Failure table, row 4: 32 sessions at once with different prompts; no errors, and every output
equals the same prompt run alone (sessions never see each other's cache)."""

from __future__ import annotations

import logging
import threading
import time

import torch

from .helpers import (
    Factory,
    Models,
    Recording,
    connect,
    prompt_of,
    run_ids,
    scaled,
    sessions_open,
    wait_until,
)

log = logging.getLogger(__name__)


def test_concurrent_sessions_equal_their_solo_runs(
    tiny_models: Models, daemon_factory: Factory
) -> None:
    sessions, n = scaled(32, 64), scaled(24, 96)
    model = tiny_models["gemma2"]
    d = daemon_factory(model, "--split", "2:4", "--max-sessions", str(sessions))
    splits = [connect(d.address, model) for _ in range(sessions)]  # own parts per thread
    solo = []
    for i, split in enumerate(splits):
        pipe = Recording(split.pipeline())
        solo.append((run_ids(pipe, prompt_of(i, 8 + i % 9), n).token_ids, pipe.logits))
        pipe.close()

    results: list[object] = [None] * sessions
    start = threading.Barrier(sessions)

    def worker(i: int) -> None:
        pipe = Recording(splits[i].pipeline())
        try:
            start.wait(60)
            results[i] = (run_ids(pipe, prompt_of(i, 8 + i % 9), n).token_ids, pipe.logits)
        except Exception as e:  # noqa: BLE001 - every error is a finding, reported below
            results[i] = e
        finally:
            pipe.close()

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    took = time.monotonic() - t0
    errors = [r for r in results if not isinstance(r, tuple)]
    assert not errors, f"{len(errors)} sessions failed, e.g. {errors[:3]}"
    for i, (got, want) in enumerate(zip(results, solo)):
        assert isinstance(got, tuple)
        assert got[0] == want[0], f"session {i}: tokens differ from its solo run"
        assert all(torch.equal(a, b) for a, b in zip(got[1], want[1])), (
            f"session {i}: logits differ"
        )
    assert len({tuple(r[0]) for r in solo}) > sessions // 2  # the prompts really lead apart
    log.info(
        "%d concurrent sessions x %d tokens in %.1f s: 0 errors, all equal to solo runs",
        sessions,
        n,
        took,
    )
    for s in splits:
        s.close()
    wait_until(lambda: sessions_open(d.address) == 0, what="sessions back to 0")
