"""The daemon stays responsive during a long step (issue 13, "two wake-ups per token"): a decode
step may run on the daemon's event loop, a prefill never does, so while a 1024-token prefill of
SmolLM2's trunk computes, the monitor keeps its cadence and another session is opened and served.

One prefill, timed from the client (its reply's ``compute_us`` says when its compute began); the
tests count what arrived while it computed. Lower bounds on counts, no timing of the step itself.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from splitlm.shared.client import TrunkClient
from splitlm.shared.plan import Fingerprint

pytestmark = [pytest.mark.realmodel]

INTERVAL_S = 0.25
"""The monitor's shortest interval: the most samples a stalled loop could miss."""

PREFILL = 1024


@dataclass
class Scene:
    """When things arrived, on the monotonic clock."""

    compute_from: float = 0.0
    """When the prefill's compute began (its reply's arrival less its compute time)."""
    prefill_done: float = 0.0
    samples: list[float] = field(default_factory=list)
    other_opened: float = 0.0
    info_answered: float = 0.0
    other_steps: list[float] = field(default_factory=list)


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Scene:
    from tests.conftest import start_daemon

    tmp: Path = tmp_path_factory.mktemp("long-prefill")
    d = start_daemon("smollm2", f"unix:{tmp / 'd.sock'}", tmp / "d.log")
    client = TrunkClient(d.address)
    out = Scene()
    monitor = client.monitor(INTERVAL_S)
    try:
        p = client.info().plan
        fp = Fingerprint(p.config_digest, p.weights_digest, p.trunk_start, p.trunk_end, p.weights or "float32")
        watching = threading.Thread(
            target=lambda: out.samples.extend(time.monotonic() for _ in monitor), daemon=True
        )
        watching.start()
        long = client.open_session(fp, torch.float32)
        sent = threading.Event()

        def the_other() -> None:
            sent.wait()
            # the prefill is on the daemon once a sample arrives after it was sent
            seen = len(out.samples)
            while len(out.samples) == seen:
                time.sleep(0.01)
            mine = client.open_session(fp, torch.float32)
            out.other_opened = time.monotonic()
            client.info()
            out.info_answered = time.monotonic()
            for i in range(3):
                mine.step(torch.randn(1, 1, p.hidden_size), i)
                out.other_steps.append(time.monotonic())
            mine.close()

        helper = threading.Thread(target=the_other, daemon=True)
        helper.start()
        sent.set()
        _, compute_s = long.step(torch.randn(1, PREFILL, p.hidden_size), 0)
        out.prefill_done = time.monotonic()
        out.compute_from = out.prefill_done - compute_s
        helper.join(300)
        long.close()
    finally:
        monitor.cancel()
        client.close()
        d.stop()
    return out


def test_monitor_keeps_its_cadence_during_a_prefill(scene: Scene) -> None:
    during = [t for t in scene.samples if scene.compute_from <= t <= scene.prefill_done]
    long_s = scene.prefill_done - scene.compute_from
    assert long_s > 4 * INTERVAL_S, f"the prefill took {long_s:.2f} s: too short to count samples in"
    # a loop held by the compute would deliver none; allow two intervals of jitter at the ends
    assert len(during) >= int(long_s / INTERVAL_S) - 2, (len(during), long_s)


def test_another_session_is_opened_and_answered_during_a_prefill(scene: Scene) -> None:
    assert scene.compute_from < scene.other_opened < scene.prefill_done
    assert scene.compute_from < scene.info_answered < scene.prefill_done
    assert len(scene.other_steps) == 3


def test_another_sessions_steps_are_served_during_a_prefill(scene: Scene) -> None:
    """Between the prefill's slices of layers (``daemon.schedule``) the other session's steps run."""
    assert scene.other_steps and scene.other_steps[0] < scene.prefill_done
