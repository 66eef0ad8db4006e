"""``splitlm-trunkd --devices`` and ``--split auto`` through a real daemon: a trunk cut over
several (CPU) devices gives the full model's greedy tokens; a daemon that is one stage of N
serves the range the plan gives it; a device that does not exist is refused at start."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from splitlm.shared.client import TrunkClient
from splitlm.shared.partition import partition_for
from tests.conftest import reference_generate, run_cli, save_tiny
from tests.integration.test_monitor import monitor_cli, read_lines
from tests.integration.test_split import split_generate
from tests.shared.test_engine import PROMPT


def test_three_cpu_devices_give_the_full_models_tokens(tiny_text_models: dict[str, Path], daemon_factory) -> None:  # type: ignore[no-untyped-def]
    model = str(tiny_text_models["llama"])
    d = daemon_factory(model, "--split", "1:5", "--devices", "cpu,cpu,cpu", "--strategy", "uniform")
    client = TrunkClient(d.address)
    try:
        p = client.info().plan
    finally:
        client.close()
    assert [(x.device, x.start, x.end) for x in p.placement] == [("cpu", 1, 3), ("cpu", 3, 4), ("cpu", 4, 5)]
    assert p.device == "cpu[1:3],cpu[3:4],cpu[4:5]"
    split = run_cli("generate", "--trunk", d.address, "--model", model, "--no-chat", "--max-new-tokens", "16",
                    "--json", "hello there")
    assert split.returncode == 0, split.stderr
    out = json.loads(split.stdout)
    assert len(out["token_ids"]) == 16
    assert out["token_ids"] == reference_generate(model, out["prompt_token_ids"], 16)
    assert "layers 1:3 on cpu; layers 3:4 on cpu; layers 4:5 on cpu" in d.log.read_text()
    proc = monitor_cli(d.address, "--interval", "0.25")
    try:
        header, sample = read_lines(proc, 2)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    assert header == "trunk over devices: layers 1:3 on cpu; layers 3:4 on cpu; layers 4:5 on cpu\n"
    assert "sessions 0" in sample


@pytest.fixture(scope="module")
def gemma2_ten(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Gemma 2 of 10 layers (sliding and global ones): default split 2:8, a trunk of 6."""
    types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(10)]
    return save_tiny("gemma2", tmp_path_factory.mktemp("g10") / "gemma2", num_hidden_layers=10, layer_types=types)


def test_split_auto_serves_its_stage_cut_over_devices(gemma2_ten: Path, daemon_factory) -> None:  # type: ignore[no-untyped-def]
    """Stage 2 of 2 by the uniform plan is 5:8; cut over two CPU devices, 5:7 and 7:8; prefill
    slices of one layer cross the device boundary. Tokens equal transformers' own generate."""
    expected = partition_for(str(gemma2_ten), "uniform", stages=2).trunk[1]
    d = daemon_factory(gemma2_ten, "--split", "auto", "--strategy", "uniform", "--stages", "2", "--stage", "2",
                       "--devices", "cpu,cpu", "--prefill-slice", "1")
    client = TrunkClient(d.address)
    try:
        p = client.info().plan
    finally:
        client.close()
    assert (p.trunk_start, p.trunk_end) == (expected.start, expected.end) == (5, 8)
    assert [(x.start, x.end) for x in p.placement] == [(5, 7), (7, 8)]
    res, _ = split_generate(d.address, gemma2_ten, 20)
    assert res.token_ids == reference_generate(gemma2_ten, PROMPT, 20)


@pytest.mark.parametrize(("extra", "words"), [
    pytest.param(("--devices", "cpu,cuda:7"), "cuda:7 does not exist here",
                 marks=pytest.mark.skipif(torch.cuda.device_count() > 7, reason="this host has a cuda:7")),
    (("--devices", "cpu,cpu:9"), "one CPU device"),
    (("--devices", "cpu,cpu,cpu,cpu"), "4 stages need at least 4 trunk layers"),
    (("--stages", "2", "--stage", "1"), "go with --split auto"),
    (("--split", "auto", "--stages", "2"), "--stage 1 to 2"),
    (("--split", "auto", "--strategy", "custom", "--layers", "2:3,4:5"), "gap"),
    (("--split", "auto", "--strategy", "custom"), "needs --layers"),
    (("--split", "auto", "--strategy", "custom", "--layers", "1:3,3:5", "--stages", "3", "--stage", "3"),
     "gives 2 stage(s)"),
])
def test_bad_devices_or_stages_are_refused_before_weights_load(
    tiny_models: dict[str, Path], capsys: pytest.CaptureFixture[str], extra: tuple[str, ...], words: str
) -> None:
    """The daemon's own entry point (``splitlm-trunkd``), in this process: each refusal comes
    before any weight loads, exit 2, no traceback."""
    from splitlm.daemon.cli import main

    rc = main(["--model", str(tiny_models["llama"]), "--listen", "unix:/tmp/never-listens.sock", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and words in err and "Traceback" not in err
