"""Split generation through a real daemon process over a real socket equals transformers'
own ``generate`` on the full model, for every family, over a unix socket and TCP loopback."""

from __future__ import annotations

import json

import pytest
import torch

from splitlm.shared import prepare
from splitlm.shared.client import TrunkClient
from splitlm.shared.generation import GenerationSettings, generate
from tests.conftest import FAMILY_KINDS, reference_generate, run_cli
from tests.shared.test_engine import PROMPT, _NoText


def split_generate(address: str, model_dir, n: int, prompt=PROMPT, stop_at_eos: bool = True):  # type: ignore[no-untyped-def]
    client = TrunkClient(address)
    info = client.info()
    model = prepare.LoadedModel(*_source(model_dir))
    parts = prepare.split_parts(model, info, torch.device("cpu"))
    pipe = prepare.split_pipeline(parts, client)
    try:
        return generate(pipe, _NoText(), list(prompt), GenerationSettings(max_new_tokens=n),
                        model.eos_ids if stop_at_eos else []), pipe
    finally:
        pipe.close()
        client.close()


def _source(model_dir):  # type: ignore[no-untyped-def]
    from splitlm.shared.models import family_for, resolve

    src = resolve(str(model_dir))
    return src, family_for(src.config), _NoText(), src.generation_eos()


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_split_through_daemon_equals_generate(tiny_models, daemon_factory, kind) -> None:  # type: ignore[no-untyped-def]
    d = daemon_factory(tiny_models[kind], "--split", "2:4")
    res, _ = split_generate(d.address, tiny_models[kind], 20)
    assert res.token_ids == reference_generate(tiny_models[kind], PROMPT, 20)


@pytest.mark.parametrize("split", ["1:5", "4:5"])
def test_edge_plans_over_tcp_loopback(tiny_models, daemon_factory, split) -> None:  # type: ignore[no-untyped-def]
    d = daemon_factory(tiny_models["gemma2"], "--split", split, tcp=True)
    assert d.address.startswith("127.0.0.1:")
    res, _ = split_generate(d.address, tiny_models["gemma2"], 20)
    assert res.token_ids == reference_generate(tiny_models["gemma2"], PROMPT, 20)


def test_wire_bytes_per_token_are_flat_in_context(tiny_models, daemon_factory) -> None:
    """Each generated token moves 2 x hidden x 4 bytes plus a small constant, whatever the context."""
    d = daemon_factory(tiny_models["llama"], "--split", "2:4")
    short8, _ = split_generate(d.address, tiny_models["llama"], 8, prompt=PROMPT[:4], stop_at_eos=False)
    short24, _ = split_generate(d.address, tiny_models["llama"], 24, prompt=PROMPT[:4], stop_at_eos=False)
    long8, _ = split_generate(d.address, tiny_models["llama"], 8, prompt=PROMPT * 6, stop_at_eos=False)
    long24, _ = split_generate(d.address, tiny_models["llama"], 24, prompt=PROMPT * 6, stop_at_eos=False)

    def marginal(a, b):  # type: ignore[no-untyped-def]
        return (b.bytes_sent + b.bytes_received - a.bytes_sent - a.bytes_received) / 16

    assert len(short24.token_ids) == len(long24.token_ids) == 24
    m_short, m_long = marginal(short8, short24), marginal(long8, long24)
    assert m_short == m_long
    assert 2 * 64 * 4 <= m_short <= 2 * 64 * 4 + 64


def test_cli_generate_json_contract(tiny_models, daemon_factory) -> None:
    d = daemon_factory(tiny_models["llama"], "--split", "2:4")
    r = run_cli("generate", "--trunk", d.address, "--model", str(tiny_models["llama"]), "--no-chat",
                "--max-new-tokens", "6", "--json", "a b c")
    # the tiny model directory has no tokenizer: the CLI must say so, not crash
    assert r.returncode == 1 and "Traceback" not in r.stderr and "tokenizer" in r.stderr.lower()


def test_info_json(tiny_models, daemon_factory) -> None:
    d = daemon_factory(tiny_models["gemma3"], "--split", "2:5", "--max-sessions", "7")
    r = run_cli("info", "--trunk", d.address, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["plan"]["family"] == "gemma" and info["plan"]["model_type"] == "gemma3_text"
    assert (info["plan"]["trunk_start"], info["plan"]["trunk_end"], info["plan"]["num_layers"]) == (2, 5, 6)
    assert info["limits"]["max_sessions"] == 7 and info["server_version"]
