"""A long prefill on a real daemon does not stall another session: that session's decode steps are
served between the prefill's slices of layers (``daemon.schedule``), and the tokens stay exact
against the full model."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch

from splitlm.shared.client import TrunkClient, TrunkStream
from splitlm.shared.models import PartSpec, build_part, family_for, resolve
from splitlm.shared.plan import Fingerprint
from tests.conftest import reference_generate, save_tiny
from tests.integration.test_split import split_generate

PREFILL = 2000
"""Positions of the long prefill: enough that each of its slices (one layer) outlasts a decode
step's round trip on the tiny model."""


def _long_model(path: Path) -> Path:
    """The tiny llama with 10 layers and room for the long prefill."""
    return save_tiny("llama", path, num_hidden_layers=10, max_position_embeddings=PREFILL + 64)


def test_decode_steps_are_served_during_a_long_prefill(tmp_path: Path, daemon_factory) -> None:  # type: ignore[no-untyped-def]
    model_dir = _long_model(tmp_path / "long")
    # 64 position-layers per slice: a 2000-position prefill runs one layer per slice (8 slices), a
    # decode step (8 position-layers) runs whole
    d = daemon_factory(model_dir, "--split", "1:9", "--prefill-slice", "64")
    src = resolve(str(model_dir))
    fp = Fingerprint(src.config_digest(), src.weights_digest(), 1, 9, "float32")
    long_h = torch.randn(1, PREFILL, 64, generator=torch.Generator().manual_seed(1))  # (1, PREFILL, H)
    short_h = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(2))  # (1, 1, H)
    client = TrunkClient(d.address)
    a, b = TrunkStream(client, fp, torch.float32), TrunkStream(client, fp, torch.float32)
    try:
        b.step(short_h, 0)
        done = threading.Event()
        replies: list[tuple[float, float]] = []  # (sent, answered) of each decode step of b

        def decode() -> None:
            position = 1
            while not done.is_set():
                sent = time.monotonic()
                b.step(short_h, position)
                replies.append((sent, time.monotonic()))
                position += 1

        stepper = threading.Thread(target=decode)
        stepper.start()
        while not replies:  # b is stepping before the prefill is sent
            time.sleep(0.001)
        began = time.monotonic()
        got, _ = a.step(long_h, 0)
        ended = time.monotonic()
        done.set()
        stepper.join()
    finally:
        a.close()
        b.close()
        client.close()
    during = [r for r in replies if r[0] > began and r[1] < ended]
    # without slicing, a step sent after the prefill arrived waits for all of it: at most the one
    # step that reached the daemon before the prefill's 0.5 MB message did could finish inside
    assert len(during) >= 3, f"{len(during)} decode steps completed during the prefill"
    part = build_part(src, family_for(src.config), PartSpec.trunk(1, 9), torch.float32, torch.device("cpu"))
    assert torch.equal(got, part.forward(long_h, 0, part.new_cache()))  # the slices changed nothing
    # and a whole split generation over a long (sliced) prompt is token-exact vs the full model
    prompt = [int(i) for i in torch.randint(4, 320, (600,), generator=torch.Generator().manual_seed(3))]
    res, _ = split_generate(d.address, model_dir, 8, prompt=prompt)
    assert res.token_ids == reference_generate(model_dir, prompt, 8)
