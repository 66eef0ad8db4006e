"""The real model every machine here has: SmolLM2-135M-Instruct (Llama architecture, Q4_1 GGUF),
through a real daemon process, against transformers' own ``generate`` on the same GGUF."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from splitlm.shared import prepare
from splitlm.shared.client import TrunkClient
from splitlm.shared.generation import GenerationSettings, generate, prompt_ids
from tests.conftest import Daemon, reference_generate, run_cli, start_daemon

pytestmark = pytest.mark.realmodel


@pytest.fixture(scope="module")
def smol_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("smol")
    d = start_daemon("smollm2", f"unix:{tmp / 'trunk.sock'}", tmp / "trunkd.log")
    yield d
    assert d.stop() == 0, "the daemon should exit 0 on SIGTERM"


def test_split_equals_transformers_generate_for_32_tokens(smol_daemon, smollm2_path: Path) -> None:  # type: ignore[no-untyped-def]
    r = run_cli("generate", "--trunk", smol_daemon.address, "--no-chat", "--temperature", "0",
                "--max-new-tokens", "40", "--json", "The history of the lighthouse begins")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["token_ids"]) >= 32
    assert out["token_ids"] == reference_generate(smollm2_path, out["prompt_token_ids"], len(out["token_ids"]), gguf=True)
    assert out["plan"]["split"] == [2, 28] and out["plan"]["layers"] == 30
    t = out["timings"]
    assert len(t["per_token_s"]) == len(out["token_ids"]) - 1
    assert len(t["client_compute_s"]) == len(t["trunk_compute_s"]) == len(out["token_ids"])
    assert all(x > 0 for x in t["trunk_compute_s"])
    assert out["bytes_sent"] > 0 and out["bytes_received"] > 0


def test_rollback_regenerates_the_same_reply(smol_daemon) -> None:  # type: ignore[no-untyped-def]
    client = TrunkClient(smol_daemon.address)
    info = client.info()
    model = prepare.load_model("smollm2")
    parts = prepare.split_parts(model, info, torch.device("cpu"))
    pipe = prepare.split_pipeline(parts, client)
    ids = prompt_ids(model.tokenizer, "Name three colours.", chat=True)
    settings = GenerationSettings(max_new_tokens=24)
    first = generate(pipe, model.tokenizer, ids, settings, model.eos_ids)
    again = generate(pipe, model.tokenizer, ids, settings, model.eos_ids)  # position 0: full rollback
    assert again.token_ids == first.token_ids
    k = 10  # regenerate the reply's tail from inside it
    tail = generate(pipe, model.tokenizer, [first.token_ids[k]], GenerationSettings(max_new_tokens=24 - k - 1),
                    model.eos_ids, start_position=len(ids) + k)
    assert tail.token_ids == first.token_ids[k + 1 :]
    pipe.close()


def test_generate_streams_and_full_gives_the_same_text(smol_daemon) -> None:  # type: ignore[no-untyped-def]
    split = run_cli("generate", "--trunk", smol_daemon.address, "--max-new-tokens", "24", "Why is the sky blue?")
    full = run_cli("generate", "--full", "--max-new-tokens", "24", "Why is the sky blue?")
    assert split.returncode == 0 and full.returncode == 0, split.stderr + full.stderr
    assert split.stdout == full.stdout and len(split.stdout.strip()) > 20


def test_compare_reports_agreement_and_ratios(smol_daemon) -> None:  # type: ignore[no-untyped-def]
    r = run_cli("compare", "--trunk", smol_daemon.address, "--max-new-tokens", "16", "--json", "Hello!")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["agreement"]["identical"] is True and out["agreement"]["first_divergence"] is None
    assert out["ratios_split_over_full"]["per_token_p50_s"] > 0
    assert out["split"]["bytes_per_token"] > 2 * 576 * 4


def test_stdin_prompt_and_stop_string(smol_daemon) -> None:  # type: ignore[no-untyped-def]
    r = run_cli("generate", "--trunk", smol_daemon.address, "--no-chat", "--max-new-tokens", "40",
                "--stop", ".", "--json", "-", stdin="The capital of France is")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["finish_reason"] in ("stop", "eos", "length") and "." not in out["text"]


def test_bad_plan_is_refused_with_the_range() -> None:
    from tests.conftest import run_trunkd

    # one daemon start: the other shapes of a bad plan are tests/shared/test_engine.py's (the rule)
    # and tests/integration/test_bad_input.py's (the daemon's refusal, on a tiny model)
    r = run_trunkd("--model", "smollm2", "--split", "3:99", "--listen", "unix:/tmp/splitlm-never.sock")
    assert r.returncode == 2, r.stderr
    assert "0 < A < B < 30" in r.stderr and "Traceback" not in r.stderr
