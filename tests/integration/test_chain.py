"""Chained daemons (issue 14, routes from plans): several ``--trunk`` addresses whose ranges tile
the trunk are one route; the client steps each hop in turn.

Real daemon subprocesses of a tiny 6-layer llama on unix sockets: a chain of 2 (1:3 + 3:5) and of
3 (1:2 + 2:3 + 3:5) give the full model's greedy tokens and transformers' own ``generate``; a hop
killed -9 mid-reply and restarted is rebuilt by replay and the reply is identical; a gap, an
overlap, another model and a dead address are clear errors with their exit codes.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from splitlm.shared import prepare
from splitlm.shared.client import TrunkClient
from splitlm.shared.failover import FailoverSession, Resumed
from splitlm.shared.generation import TokenEvent
from splitlm.shared.route import ChainSession, RouteClient
from tests.conftest import Daemon, reference_generate, run_cli, start_daemon
from tests.integration.test_monitor import monitor_cli, read_lines
from tests.reliability.helpers import FAST_RETRY, Recording, run_ids
from tests.shared.test_engine import PROMPT, _NoText

RANGES = {"a13": "1:3", "a35": "3:5", "a12": "1:2", "a23": "2:3"}
"""The llama daemons of this module: a chain of two is a13 + a35, of three a12 + a23 + a35."""

TEXT = "hello chain"
N = 10


@pytest.fixture(scope="module")
def chain(tiny_text_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Daemon]]:
    """One daemon per range in ``RANGES`` (tiny llama), plus ``gpt2`` (another model, 3:5)."""
    root = tmp_path_factory.mktemp("chain")
    started: dict[str, Daemon] = {}
    try:
        for name, split in RANGES.items():
            started[name] = start_daemon(
                tiny_text_models["llama"], f"unix:{root / f'{name}.sock'}", root / f"{name}.log", "--split", split
            )
        started["gpt2"] = start_daemon(
            tiny_text_models["gpt2"], f"unix:{root / 'gpt2.sock'}", root / "gpt2.log", "--split", "3:5"
        )
        yield started
    finally:
        for d in started.values():
            d.stop()


def _trunks(chain: dict[str, Daemon], *names: str) -> list[str]:
    return [part for n in names for part in ("--trunk", chain[n].address)]


def _generate(model: Path, *args: str) -> dict[str, object]:
    r = run_cli("generate", "--model", str(model), "--temperature", "0", "--max-new-tokens", str(N),
                "--no-chat", "--json", *args, TEXT)
    assert r.returncode == 0, r.stderr
    out: dict[str, object] = json.loads(r.stdout)
    return out


@pytest.mark.parametrize("names", [("a13", "a35"), ("a23", "a35", "a12")], ids=["2 hops", "3 hops"])
def test_a_chain_equals_the_full_model(
    chain: dict[str, Daemon], tiny_text_models: dict[str, Path], names: tuple[str, ...]
) -> None:
    """``splitlm generate --trunk A --trunk B [--trunk C]`` (given in any order) gives the full
    model's greedy tokens and transformers' own; the plan is the route's range, 1:5."""
    model = tiny_text_models["llama"]
    got = _generate(model, *_trunks(chain, *names))
    full = _generate(model, "--full")
    assert got["token_ids"] == full["token_ids"]
    assert got["plan"]["split"] == [1, 5]  # type: ignore[index]
    want = reference_generate(model, got["prompt_token_ids"], N)  # type: ignore[arg-type]
    assert got["token_ids"] == want


def test_info_shows_each_daemon_and_the_route(chain: dict[str, Daemon]) -> None:
    r = run_cli("info", "--json", *_trunks(chain, "a35", "a12", "a23"))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [d["plan"]["trunk_start"] for d in out["daemons"]] == [3, 1, 2]
    assert out["route"]["layers"] == [1, 5]
    assert [s["layers"] for s in out["route"]["stages"]] == [[1, 2], [2, 3], [3, 5]]
    text = run_cli("info", *_trunks(chain, "a13", "a35"))
    assert text.returncode == 0 and "route       layers 1:5 in 2 hops: 1:3 -> 3:5" in text.stdout


@pytest.mark.parametrize(
    ("names", "code", "words"),
    [
        (("a12", "a35"), 2, "leave a gap: layers 2:3 are served by none"),
        (("a13", "a23"), 2, "overlap: layers 2:3 are served twice"),
        (("a13", "gpt2"), 2, "does not serve the model"),
        (("a13", "a13"), 2, "is given twice"),
    ],
    ids=["gap", "overlap", "another model", "twice"],
)
def test_a_bad_route_is_refused_before_any_model_loads(
    chain: dict[str, Daemon], tiny_text_models: dict[str, Path], names: tuple[str, ...], code: int, words: str
) -> None:
    r = run_cli("generate", "--model", str(tiny_text_models["llama"]), "--max-new-tokens", "2",
                *_trunks(chain, *names), TEXT, timeout=120)
    assert r.returncode == code, r.stderr
    assert words in r.stderr and "Traceback" not in r.stderr
    for n in names:  # the message names the addresses involved
        assert chain[n].address in r.stderr
    if "gpt2" in names:  # and what differs
        assert f"the daemon at {chain['gpt2'].address} does not serve" in r.stderr
        assert "model config digest" in r.stderr and "family gpt2/gpt2" in r.stderr


def test_a_dead_address_is_named(chain: dict[str, Daemon], tmp_path: Path) -> None:
    dead = f"unix:{tmp_path / 'nobody.sock'}"
    r = run_cli("generate", "--max-new-tokens", "2", *_trunks(chain, "a13"), "--trunk", dead, TEXT, timeout=120)
    assert r.returncode == 1 and f"no trunk daemon answers at {dead}" in r.stderr
    assert "Traceback" not in r.stderr
    r = run_cli("info", *_trunks(chain, "a13"), "--trunk", dead, timeout=120)
    assert r.returncode == 1 and chain["a13"].address in r.stdout and dead in r.stdout


def test_monitor_follows_each_daemon(chain: dict[str, Daemon], tmp_path: Path) -> None:
    """``splitlm monitor --trunk A --trunk B``: both daemons' samples, each line with its address;
    Ctrl-C ends it with 0. A daemon that does not answer ends it with exit 1, named; ``relay``
    still takes one address."""
    a, b = chain["a13"].address, chain["a35"].address
    proc = monitor_cli(a, "--trunk", b, "--interval", "0.25", "--json")
    try:
        lines = read_lines(proc, 8)
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    samples = [json.loads(line) for line in lines]
    assert {s["address"] for s in samples} == {a, b} and all("cpu_percent" in s for s in samples)
    proc = monitor_cli(a, "--trunk", b, "--interval", "0.25")
    try:
        text = read_lines(proc, 4)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    assert {line.split("  ")[0] for line in text} == {a, b} and all(" cpu " in line for line in text)
    dead = f"unix:{tmp_path / 'nobody.sock'}"
    r = run_cli("monitor", "--trunk", a, "--trunk", dead, timeout=60)
    assert r.returncode == 1 and dead in r.stderr and "Traceback" not in r.stderr
    r = run_cli("relay", *_trunks(chain, "a13", "a35"), "--listen", "127.0.0.1:0", timeout=60)
    assert r.returncode == 2 and "splitlm relay talks to one daemon" in r.stderr


def test_a_hop_killed_mid_reply_is_rebuilt_by_replay(
    tiny_text_models: dict[str, Path], tmp_path: Path
) -> None:
    """The second hop of a chain of two is SIGKILLed after token 5 and restarted: its own
    failover session replays what it was sent, the first hop keeps its cache, and every step's
    logits equal the uninterrupted run's bit for bit."""
    from splitlm.shared.models import family_for, resolve

    model_dir = tiny_text_models["llama"]
    first = start_daemon(model_dir, f"unix:{tmp_path / 'h1.sock'}", tmp_path / "h1.log", "--split", "1:3")
    second = start_daemon(model_dir, f"unix:{tmp_path / 'h2.sock'}", tmp_path / "h2.log", "--split", "3:5")
    restarted: dict[str, Daemon] = {}
    client = RouteClient([TrunkClient(first.address), TrunkClient(second.address)])
    try:
        src = resolve(str(model_dir))
        model = prepare.LoadedModel(src, family_for(src.config), _NoText(), src.generation_eos())  # type: ignore[arg-type]
        parts = prepare.split_parts(model, client.info(), torch.device("cpu"))
        n, kill_at = 16, 5
        ref = Recording(prepare.split_pipeline(parts, client))
        want = run_ids(ref, PROMPT, n)
        ref.close()

        def restart() -> None:
            time.sleep(0.5)
            restarted["d"] = start_daemon(model_dir, second.address, tmp_path / "h2b.log", "--split", "3:5")

        threads: list[threading.Thread] = []

        def on_token(ev: TokenEvent) -> None:
            if ev.index == kill_at:
                second.proc.kill()
                second.proc.wait()
                threads.append(threading.Thread(target=restart, daemon=True))
                threads[0].start()

        events: list[object] = []
        pipe = Recording(prepare.split_pipeline(parts, client, retry=FAST_RETRY, on_reconnect=events.append))
        got = run_ids(pipe, PROMPT, n, on_token=on_token)
        threads[0].join()
        session = pipe.inner.session
        assert isinstance(session, ChainSession)
        hop1, hop2 = session.hops
        assert isinstance(hop1, FailoverSession) and isinstance(hop2, FailoverSession)
        assert got.token_ids == want.token_ids
        for i, (a, b) in enumerate(zip(pipe.logits, ref.logits)):
            assert torch.equal(a, b), f"step {i} differs after the hop's failover"
        assert not hop1.resumes and len(hop2.resumes) == 1
        resumed = [e for e in events if isinstance(e, Resumed)]
        assert resumed and resumed[0].replayed_positions == len(PROMPT) + kill_at + 1
        pipe.close()
    finally:
        client.close()
        first.stop()
        if "d" in restarted:
            restarted["d"].stop()
        else:
            second.stop()
