"""Failover on the real model (SmolLM2-135M, Q4_1 GGUF, 30 layers, split 2:28): ``splitlm
generate`` survives kill -9 of its daemon with the same text, and the replay that rebuilds the
trunk cache is bit-identical to the steps that built it, where one prefill is not. Logs the
replay's cost (``-o log_cli=true -o log_cli_level=INFO`` shows it)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from splitlm.shared import prepare
from splitlm.shared.client import TrunkClient, TrunkStream
from splitlm.shared.failover import FailoverSession, RetryPolicy
from splitlm.shared.generation import GenerationSettings, generate, prompt_ids
from tests.conftest import run_cli, start_daemon

from .helpers import LONG, Factory, scaled, wait_until

pytestmark = [pytest.mark.realmodel, pytest.mark.slow]
log = logging.getLogger(__name__)

PROMPT = "Write a long, detailed story about a lighthouse keeper and a storm."


def test_cli_generate_survives_kill9(daemon_factory: Factory, tmp_path: Path) -> None:
    d = daemon_factory("smollm2")
    args = [
        "generate",
        "--trunk",
        d.address,
        "--temperature",
        "0",
        "--max-new-tokens",
        str(scaled(40, 160)),
        PROMPT,
    ]
    t0 = time.monotonic()
    ref = run_cli(*args)
    assert ref.returncode == 0, ref.stderr
    ref_s = time.monotonic() - t0
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    again = None
    with out.open("wb") as fo, err.open("wb") as fe:
        client = subprocess.Popen(
            [sys.executable, "-m", "splitlm.tui.cli", "--log-level", "INFO", *args],
            stdout=fo,
            stderr=fe,
            env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
        )
        try:
            wait_until(
                lambda: out.stat().st_size >= 30 or client.poll() is not None,
                timeout=180,
                what="30 characters of the reply",
            )
            assert client.poll() is None, (
                "the reply finished before the kill: nothing was interrupted"
            )
            d.proc.kill()
            d.proc.wait()
            killed = time.monotonic()
            time.sleep(1)  # the client meets a dead socket for a while
            again = start_daemon("smollm2", d.address, tmp_path / "again.log")
            back = time.monotonic()
            try:
                rc = client.wait(300)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the client hangs after the restart:\n{err.read_text()[-3000:]}")
            assert rc == 0, err.read_text()
        finally:
            if client.poll() is None:
                client.kill()
            if again is not None:
                assert again.stop() == 0
    assert out.read_text() == ref.stdout
    notices = err.read_text()
    assert (
        "splitlm: lost the trunk daemon" in notices and "splitlm: reconnected after" in notices
    ), notices
    resumed = next(line for line in notices.splitlines() if "reconnected after" in line)
    log.info(
        "kill -9 at %d characters; restarted daemon answered %.1f s after the kill; client %s; "
        "(uninterrupted reference run %.1f s)",
        30, back - killed, resumed.removeprefix("splitlm: "), ref_s,
    )


@pytest.mark.skipif(not LONG, reason="a measurement for RELIABILITY.md: SPLITLM_LONG=1 runs it")
def test_replay_is_bit_identical_and_its_cost(daemon_factory: Factory) -> None:
    """Generate N tokens, keeping each step's trunk output; then rebuild the cache on a new
    session three ways and time them: pipelined replay (what failover does), the same replay
    one round trip at a time, and one prefill of all positions (not what failover does)."""
    d = daemon_factory("smollm2")
    client = TrunkClient(d.address)
    model = prepare.load_model("smollm2")
    parts = prepare.split_parts(model, client.info(), torch.device("cpu"))
    pipe = prepare.split_pipeline(parts, client, retry=RetryPolicy())
    session = pipe.session
    assert isinstance(session, FailoverSession)
    outputs: list[bytes] = []
    step = session.step

    def keep(hidden: torch.Tensor, position: int) -> tuple[torch.Tensor, float]:
        out, s = step(hidden, position)
        outputs.append(out.numpy().tobytes())
        return out, s

    session.step = keep  # type: ignore[method-assign]
    ids = prompt_ids(model.tokenizer, PROMPT, chat=True)
    n = int(os.environ.get("SPLITLM_REPLAY_TOKENS", "160"))
    res = generate(pipe, model.tokenizer, ids, GenerationSettings(max_new_tokens=n), [])
    steps = [(s.hidden, s.position) for s in session.history.steps]
    positions = session.history.positions
    assert len(steps) == len(res.token_ids) == n and positions == len(ids) + n - 1

    def fresh() -> TrunkStream:
        return TrunkStream(client, parts.fingerprint, parts.trunk_dtype)

    s1 = fresh()
    t0 = time.perf_counter()
    replayed = s1.replay(steps)
    pipelined_s = time.perf_counter() - t0
    s1.close()
    assert [r.hidden.data for r in replayed] == outputs, "the replay did not rebuild the same cache"

    s2 = fresh()
    t0 = time.perf_counter()
    for hidden, position in steps:
        s2.step_tensor(hidden, position)
    sequential_s = time.perf_counter() - t0
    s2.close()

    # one prefill: the same positions in one chunk; compare its last position with the original
    from splitlm.protos import trunk_pb2 as pb

    whole = pb.Tensor(
        dtype=steps[0][0].dtype,
        shape=[1, positions, steps[0][0].shape[2]],
        data=b"".join(h.data for h, _ in steps),
    )
    s3 = fresh()
    t0 = time.perf_counter()
    prefill = s3.step_tensor(whole, 0)
    prefill_s = time.perf_counter() - t0
    s3.close()
    width = steps[0][0].shape[2] * 4
    prefill_same = prefill.hidden.data[-width:] == outputs[-1]

    # the alternative design: keep token ids only and recompute the bottom for the replay
    bottom_cache = parts.bottom.new_cache()
    chunks = [ids] + [[t] for t in res.token_ids[:-1]]
    t0 = time.perf_counter()
    position = 0
    for chunk in chunks:
        parts.bottom.forward(torch.tensor([chunk]), position, bottom_cache)
        position += len(chunk)
    bottom_s = time.perf_counter() - t0
    pipe.close()
    client.close()
    log.info(
        "replay of %d positions in %d steps (SmolLM2, split 2:28, float32, daemon 1 thread): "
        "pipelined %.0f ms, one round trip per step %.0f ms, one prefill %.0f ms "
        "(bit-identical: %s); history %.0f KiB (%d B/position); recomputing the bottom instead "
        "would cost %.0f ms",
        positions,
        len(steps),
        pipelined_s * 1e3,
        sequential_s * 1e3,
        prefill_s * 1e3,
        prefill_same,
        session.history.nbytes / 1024,
        session.history.nbytes // positions,
        bottom_s * 1e3,
    )
