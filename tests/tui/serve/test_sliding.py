"""``splitlm serve`` over a sliding-window family (the tiny random Mistral, window 6): a kept
conversation extended by a turn steps only its new tokens, and one edited below what the window
keeps (the caches' rollback floor) is re-prefilled from position 0. Either way the greedy reply is
transformers' own ``generate`` on the full model for the whole prompt.

A real daemon subprocess and a real gateway subprocess; the daemon's ``splitlm_positions_total``
counts what its trunk computed.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from splitlm.shared.cache import ROLLBACK_DEPTH
from tests.conftest import SLIDING_WINDOW, Daemon, free_port, reference_generate, start_daemon
from tests.tui.conftest import COMMON, save_word_tokenizer

from .helpers import start_serve, stop_serve

pytestmark = pytest.mark.slow

SYSTEM = {"role": "system", "content": "you are a small model that can tell the way to the sea"}


@dataclass
class Sliding:
    daemon: Daemon
    url: str
    metrics_url: str
    model: Path

    def metric(self, name: str, url: str) -> float:
        m = re.search(rf"^{name} ([0-9.e+-]+)$", httpx.get(url).text, re.M)
        assert m, f"{name} not in {url}"
        return float(m.group(1))

    def positions(self) -> float:
        """Positions the daemon's trunk has computed so far."""
        return self.metric("splitlm_positions_total", self.metrics_url)

    def opened(self) -> float:
        """Trunk sessions the gateway has opened so far."""
        return self.metric("splitlm_serve_sessions_opened", f"{self.url}/metrics")

    def ask(self, messages: list[dict[str, str]], n: int = 6) -> openai.types.chat.ChatCompletion:
        c = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120)
        return c.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=n)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def sliding(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sliding]:
    root = tmp_path_factory.mktemp("serve-sliding")
    model = root / "mistral"
    shutil.copytree(tiny_models["mistral"], model)
    cfg = json.loads((model / "config.json").read_text())
    assert cfg["sliding_window"] == SLIDING_WINDOW
    cfg["max_position_embeddings"] = 1024
    (model / "config.json").write_text(json.dumps(cfg))
    save_word_tokenizer(model)
    mport = free_port()
    daemon = start_daemon(model, f"unix:{root / 'd.sock'}", root / "d.log", "--split", "2:4",
                          "--metrics", f"127.0.0.1:{mport}")
    try:
        # one session: the edited conversation must roll the kept one back, not open another
        proc, url = start_serve(daemon.address, model, root / "serve.log", "--max-sessions", "1")
    except BaseException:
        daemon.stop()
        raise
    try:
        yield Sliding(daemon, url, f"http://127.0.0.1:{mport}/metrics", model)
    finally:
        stop_serve(proc)
        daemon.stop()


def want(model: Path, messages: list[dict[str, str]], n: int = 6) -> tuple[list[int], str]:
    """The prompt's ids and the full model's greedy reply to them (up to the first EOS)."""
    from splitlm.shared.prepare import load_model

    loaded = load_model(str(model))
    ids = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    ref = reference_generate(model, list(ids), n)
    eos = set(loaded.eos_ids)
    ref = ref[: next((i for i, t in enumerate(ref) if t in eos), len(ref))]
    return list(ids), loaded.tokenizer.decode(ref, skip_special_tokens=True)


def test_extended_and_edited_conversations_equal_the_full_model(sliding: Sliding) -> None:
    # a long first message: the conversation soon holds more than the window and the positions
    # kept beyond it for rollbacks (ROLLBACK_DEPTH), so an early edit is below the floor
    turn1 = [SYSTEM, {"role": "user", "content": " ".join(COMMON[:ROLLBACK_DEPTH + 20])}]
    ids1, text1 = want(sliding.model, turn1)
    assert len(ids1) > SLIDING_WINDOW + ROLLBACK_DEPTH + 20
    r1 = sliding.ask(turn1)
    assert r1.choices[0].message.content == text1
    assert sliding.opened() == 1

    # the next turn extends the kept conversation: the trunk computes only what is new
    turn2 = [*turn1, {"role": "assistant", "content": text1}, {"role": "user", "content": "and the sea"}]
    ids2, text2 = want(sliding.model, turn2)
    before = sliding.positions()
    r2 = sliding.ask(turn2)
    assert r2.choices[0].message.content == text2
    assert r2.usage is not None
    computed = sliding.positions() - before
    assert computed < len(ids2) - len(ids1) + r2.usage.completion_tokens, (computed, len(ids1), len(ids2))

    # the first message edited: the kept session (the only one) agrees only on a few leading
    # tokens, far below the window's floor, so the whole prompt is stepped again from position 0
    edited = [{"role": "system", "content": "you are a big model"}, *turn2[1:]]
    ids3, text3 = want(sliding.model, edited)
    before = sliding.positions()
    r3 = sliding.ask(edited)
    assert r3.choices[0].message.content == text3
    assert r3.usage is not None
    assert sliding.positions() - before == len(ids3) + r3.usage.completion_tokens - 1
    assert sliding.opened() == 1  # every turn ran on the same trunk session
