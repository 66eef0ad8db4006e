"""The client's two sessions are one ``RemoteSession``: pipelines and the chat app use the
protocol and never probe the concrete class (the chat app's Esc used ``hasattr(session,
"cancel")`` because only the failover session had it)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

from splitlm.shared.client import RemoteSession, TrunkClient, TrunkStream
from splitlm.shared.failover import NO_FAILOVER, FailoverSession, RetryPolicy
from splitlm.shared.plan import Fingerprint

METHODS = [n for n, v in vars(RemoteSession).items() if not n.startswith("_") and inspect.isfunction(v)]
PROPERTIES = [n for n, v in vars(RemoteSession).items() if isinstance(v, property)]


def test_the_protocol_names_what_callers_use() -> None:
    assert sorted(METHODS) == ["cancel", "close", "step"]
    assert sorted(PROPERTIES) == ["bytes_received", "bytes_sent", "rollback_floor", "session_id", "wire_dtype"]


@pytest.mark.parametrize("cls", [TrunkStream, FailoverSession])
def test_each_session_takes_the_protocols_arguments(cls: type) -> None:
    """Every protocol parameter, by name and in order; a session may add only parameters with
    defaults (``TrunkStream.close(wait_s=...)``)."""
    for name in METHODS:
        want = list(inspect.signature(getattr(RemoteSession, name)).parameters.values())
        got = list(inspect.signature(getattr(cls, name)).parameters.values())
        assert [p.name for p in got[: len(want)]] == [p.name for p in want], (cls, name)
        assert all(p.default is not inspect.Parameter.empty for p in got[len(want) :]), (cls, name)


def test_plain_and_failover_sessions_are_remote_sessions(
    tiny_models: dict[str, Path], daemon_factory
) -> None:  # type: ignore[no-untyped-def]
    d = daemon_factory(tiny_models["llama"], "--split", "2:4")
    client = TrunkClient(d.address)
    p = client.info().plan
    fp = Fingerprint(p.config_digest, p.weights_digest, p.trunk_start, p.trunk_end)
    sessions = {
        TrunkStream: client.open_session(fp, torch.float32, retry=NO_FAILOVER),
        FailoverSession: client.open_session(fp, torch.float32, retry=RetryPolicy()),
    }
    try:
        for cls, s in sessions.items():
            assert type(s) is cls and isinstance(s, RemoteSession)
            s.cancel()  # no reconnect in progress: nothing stops, the session still steps
            out, compute_s = s.step(torch.randn(1, 3, p.hidden_size), 0)
            assert out.shape == (1, 3, p.hidden_size) and compute_s >= 0
            assert s.wire_dtype == torch.float32 and s.session_id and s.rollback_floor == 0
            assert s.bytes_sent > 3 * p.hidden_size * 4 and s.bytes_received > 3 * p.hidden_size * 4
    finally:
        for s in sessions.values():
            s.close()
        client.close()
