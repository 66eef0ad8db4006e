"""Cross-session batching (``splitlm-trunkd --batch``) against a real daemon process: sessions with
different prompt lengths run concurrently, their decode steps are batched (the daemon's ``Info``
counts the batches), and each session's tokens equal the same prompt run alone, for every family."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from splitlm.shared import prepare
from splitlm.shared.client import TrunkClient
from splitlm.shared.config import DaemonSettings, load
from splitlm.shared.errors import TrunkError
from splitlm.shared.generation import GenerationSettings, generate
from splitlm.shared.plan import Fingerprint
from tests.conftest import FAMILY_KINDS
from tests.integration.test_split import _source, split_generate
from tests.shared.test_engine import PROMPT, _NoText

PROMPTS = [PROMPT[:3], PROMPT, PROMPT[5:14], PROMPT[:1] + PROMPT[::-1]]
"""Lengths 3, 20, 9, 21: on both sides of the tiny sliding window (6)."""
TOKENS = 12


def _concurrently(fns: list) -> list:  # type: ignore[type-arg]
    results: list = [None] * len(fns)

    def run(i: int) -> None:
        try:
            results[i] = fns[i]()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return results


def _tokens(address: str, model_dir, prompt) -> list[int]:  # type: ignore[no-untyped-def]
    res, _ = split_generate(address, model_dir, TOKENS, prompt=prompt, stop_at_eos=False)
    return list(res.token_ids)


def _together(address: str, model_dir, prompts) -> list:  # type: ignore[no-untyped-def]
    """Each prompt in its own session and thread, all at once. The client parts are loaded first,
    one after the other (loading is not thread-safe); then the generations run concurrently."""
    client = TrunkClient(address)
    model = prepare.LoadedModel(*_source(model_dir))
    parts = prepare.split_parts(model, client.info(), torch.device("cpu"))
    pipes = [prepare.split_pipeline(parts, client) for _ in prompts]
    try:
        return _concurrently([
            lambda pipe=pipe, p=p: list(
                generate(pipe, _NoText(), list(p), GenerationSettings(max_new_tokens=TOKENS), []).token_ids
            )
            for pipe, p in zip(pipes, prompts)
        ])
    finally:
        for pipe in pipes:
            pipe.close()
        client.close()


def _batched_equal_solo(d, model, check_info) -> None:  # type: ignore[no-untyped-def]
    """Each prompt alone, then all at once: the same tokens, and the daemon batched steps.
    ``check_info`` looks at the daemon's ``Info`` before the concurrent run."""
    solo = [_tokens(d.address, model, p) for p in PROMPTS]  # one session at a time: nothing to batch
    client = TrunkClient(d.address)
    try:
        check_info(client.info())
        together = _together(d.address, model, PROMPTS)
        stats = client.info().batching
    finally:
        client.close()
    assert together == solo
    assert stats.batches > 0 and stats.batched_steps >= 2 * stats.batches
    assert "Traceback" not in d.log_text()


def _batching_on_nothing_batched(info) -> None:  # type: ignore[no-untyped-def]
    assert info.batching.enabled and info.batching.batches == 0


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_concurrent_sessions_are_batched_and_equal_solo(tiny_models, daemon_factory, kind) -> None:  # type: ignore[no-untyped-def]
    model = tiny_models[kind]
    # a window so that the steps of the concurrent clients surely meet in the daemon
    d = daemon_factory(model, "--split", "1:5", "--batch", "--batch-window", "20ms")
    _batched_equal_solo(d, model, _batching_on_nothing_batched)


def test_a_bad_step_fails_alone_while_others_are_batched(tiny_models, daemon_factory) -> None:
    model = tiny_models["gemma3"]
    d = daemon_factory(model, "--split", "1:5", "--batch", "--batch-window", "20ms")
    solo = [_tokens(d.address, model, p) for p in PROMPTS[:3]]
    client = TrunkClient(d.address)
    info = client.info()
    plan = info.plan
    fp = Fingerprint(plan.config_digest, plan.weights_digest, plan.trunk_start, plan.trunk_end)

    def bad_session() -> str:
        session = client.open_session(fp, torch.float32)
        try:
            session.step(torch.randn(1, 4, plan.hidden_size), 0)
            deadline = time.monotonic() + 120
            while client.info().batching.batches == 0 and time.monotonic() < deadline:
                time.sleep(0.005)  # until the others' steps are being batched
            try:  # a one-position step that leaves a gap: it joins a batch and must fail alone
                session.step(torch.randn(1, 1, plan.hidden_size), 9)
            except TrunkError as e:
                return str(e)
            return "no error"
        finally:
            session.close()

    try:
        results = _concurrently([bad_session, lambda: _together(d.address, model, PROMPTS[:3])])
        stats = client.info().batching
    finally:
        client.close()
    assert "gap" in str(results[0]), results[0]
    assert results[1] == solo
    assert stats.batches > 0
    assert d.proc.poll() is None and "Traceback" not in d.log_text()


def test_batching_is_off_by_default_and_set_like_every_option(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Off by default (a batched row equals its solo step to rounding only); flag, environment and
    TOML turn it on. (A daemon's ``Info`` with batching off is checked by the bench's tests.)"""
    s = load(DaemonSettings, {}, env={}, config=None).settings
    assert (s.batch, s.batch_window) == (False, 0.0)
    s = load(DaemonSettings, {}, env={"SPLITLM_BATCH": "1", "SPLITLM_BATCH_WINDOW": "2ms"}, config=None).settings
    assert (s.batch, s.batch_window) == (True, 0.002)
    f = tmp_path / "trunkd.toml"
    f.write_text('batch = true\nbatch_window = "5ms"\n')
    s = load(DaemonSettings, {}, env={}, config=f).settings
    assert (s.batch, s.batch_window) == (True, 0.005)


def test_int8_weights_are_batched_and_equal_solo(tiny_models, daemon_factory) -> None:  # type: ignore[no-untyped-def]
    """``--batch --weights int8`` runs (it was refused, for a reason that held only for dynamic
    int8): the client takes the daemon's int8, sessions are batched and give their solo tokens."""
    model = tiny_models["llama"]
    d = daemon_factory(model, "--split", "1:5", "--batch", "--batch-window", "20ms", "--weights", "int8")

    def int8(info) -> None:  # type: ignore[no-untyped-def]
        assert info.plan.weights == "int8"
        _batching_on_nothing_batched(info)

    _batched_equal_solo(d, model, int8)


def test_a_trunk_over_devices_is_batched_and_equal_solo(tiny_models, daemon_factory) -> None:  # type: ignore[no-untyped-def]
    """``--batch --devices cpu,cpu``: the batched steps cross the device boundary (each device's
    layers with their own caches), and every session gives its solo tokens; Gemma 2, whose
    alternating sliding and global layers put one of each on each device."""
    model = tiny_models["gemma2"]
    d = daemon_factory(model, "--split", "1:5", "--batch", "--batch-window", "20ms", "--devices", "cpu,cpu",
                       "--strategy", "uniform")

    def two_devices(info) -> None:  # type: ignore[no-untyped-def]
        assert [(p.start, p.end) for p in info.plan.placement] == [(1, 3), (3, 5)]
        _batching_on_nothing_batched(info)

    _batched_equal_solo(d, model, two_devices)
