"""Cross-session batching (``splitlm-trunkd --batch``) with speculative verification steps in the
mix: sessions step as a drafting client does (a verification of 3-5 positions, then the next step
from just past the accepted tokens, rolling the cache back; one-position steps in between), all
at once, so the daemon's batches hold rolled-back one-position steps of some sessions while
others send multi-position steps. Each session's outputs must equal what it gets alone."""

from __future__ import annotations

import random
import threading

import torch

from splitlm.shared.client import TrunkClient
from splitlm.shared.plan import Fingerprint

SESSIONS = 4
STEPS = 14


def _script(seed: int, hidden: int) -> list[tuple[torch.Tensor, int]]:
    """``(hidden states, position)`` of one session: a prefill, then steps of 1 or 3-5 positions
    each starting just past the previous step's "accepted" part (0 to t-1 positions of it, the
    rest rolled back), as speculative decoding steps."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    t = 5 + seed
    steps = [(torch.randn(1, t, hidden, generator=g), 0)]
    position = t
    for _ in range(STEPS):
        t = rng.choice([1, 1, 3, 4, 5])
        steps.append((torch.randn(1, t, hidden, generator=g), position))
        position += rng.randint(0, t - 1) + 1  # below the cached length unless all were accepted
    return steps


def _run(client: TrunkClient, fp: Fingerprint, script: list[tuple[torch.Tensor, int]],
         barrier: threading.Barrier | None = None) -> list[torch.Tensor]:
    session = client.open_session(fp, torch.float32)
    try:
        out = []
        for h, position in script:
            if barrier is not None:
                barrier.wait(60)  # every session sends its next step at once
            out.append(session.step(h, position)[0])
        return out
    finally:
        session.close()


def test_verification_steps_mixed_with_rolled_back_decode_steps(tiny_models, daemon_factory) -> None:  # type: ignore[no-untyped-def]
    # the tiny qwen2's trunk [1, 5) has full-attention layers (1, 2) and sliding-window ones (3, 4:
    # a window of 6, crossed by every session's positions)
    d = daemon_factory(tiny_models["qwen2"], "--split", "1:5", "--batch", "--batch-window", "20ms")
    client = TrunkClient(d.address)
    try:
        p = client.info().plan
        fp = Fingerprint(p.config_digest, p.weights_digest, p.trunk_start, p.trunk_end)
        scripts = [_script(s, p.hidden_size) for s in range(SESSIONS)]
        alone = [_run(client, fp, s) for s in scripts]  # one session at a time: nothing to batch
        assert client.info().batching.batches == 0

        barrier = threading.Barrier(SESSIONS)
        together: list[list[torch.Tensor] | BaseException | None] = [None] * SESSIONS

        def work(i: int) -> None:
            try:
                together[i] = _run(client, fp, scripts[i], barrier)
            except BaseException as e:  # noqa: BLE001 - reported below
                together[i] = e
                barrier.abort()

        threads = [threading.Thread(target=work, args=(i,)) for i in range(SESSIONS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        stats = client.info().batching
    finally:
        client.close()
    for i, outs in enumerate(together):
        assert isinstance(outs, list), f"session {i}: {outs!r}"
        for k, (a, b) in enumerate(zip(alone[i], outs)):
            assert a.shape == b.shape
            # a batched row equals its solo step to float rounding (the daemon's --batch help)
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=lambda m: f"session {i} step {k}: {m}")  # noqa: B023
    assert stats.batches > 0 and stats.batched_steps >= 2 * stats.batches
    assert "Traceback" not in d.log_text()
