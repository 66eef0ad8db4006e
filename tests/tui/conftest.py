"""TUI fixtures: a tiny random Llama with a tiny word-level tokenizer (so replies have text),
a daemon serving it, and app configs pointing at it with a private data dir.

The tokenizer is built here with the ``tokenizers`` library: 320 entries (the tiny model's vocab),
whole words, specials ``<s>``=1 and ``</s>``=2 as the model's config has them, and a small chat
template, so the chat path (templates, multi-turn ids) runs for real.
"""

from __future__ import annotations

import json
import shutil
import string
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Daemon, start_daemon

SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<unk>"]
COMMON = (
    "the of and to in is it you that he was for on are with as his they be at one have this from or "
    "had by hot word but what some we can out other were all there when up use your how said an each "
    "she which do their time if will way about many then them write would like so these her long make "
    "thing see him two has look more day could go come did number sound no most people my over know "
    "water than call first who may down side been now find any new work part take get place made live "
    "where after back little only round man year came show every good me give our under name very "
    "through just form sentence great think say help low line differ turn cause much mean before move "
    "right boy old too same tell does set three want air well also play small end put home read hand "
    "port large spell add even land here must big high such follow act why ask men change went light "
    "kind off need house picture try us again animal point mother world near build self earth father "
    "head stand own page should country found answer school grow study still learn plant cover food sun "
    "four between state keep eye never last let thought city tree cross farm hard start might story saw "
    "far sea draw left late run while press close night real life few north open seem together next "
    "white children begin got walk example ease paper group always music those both mark often letter "
    "until mile river car feet care second book carry took sky blue"
).split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{% endif %}"
)


def save_word_tokenizer(path: Path, vocab_size: int = 320) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIALS + ["user", "assistant", "system"] + list(string.ascii_lowercase + string.digits) + list(".,!?:;-")
    vocab: dict[str, int] = {}
    for w in words + COMMON:
        if w not in vocab and len(vocab) < vocab_size:
            vocab[w] = len(vocab)
    assert len(vocab) == vocab_size, len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)


@pytest.fixture(scope="session")
def chat_model(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Llama with a tokenizer and a chat template, and room for long replies
    (4096 positions instead of 256: the Esc and daemon-death tests need replies that last)."""
    dst = tmp_path_factory.mktemp("chatmodel") / "llama"
    shutil.copytree(tiny_models["llama"], dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["max_position_embeddings"] = 4096
    (dst / "config.json").write_text(json.dumps(cfg))
    save_word_tokenizer(dst)
    return dst


@pytest.fixture(scope="session")
def chat_daemon(chat_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon for the TUI tests that leave it running (each app opens its own session)."""
    root = tmp_path_factory.mktemp("chatd")
    d = start_daemon(chat_model, f"unix:{root / 'd.sock'}", root / "d.log", "--split", "2:4")
    yield d
    d.stop()


@pytest.fixture
def make_config(tmp_path: Path, chat_model: Path) -> Callable[..., object]:
    """An ``AppConfig`` for a daemon address: private data dir and log file, no animations."""
    from splitlm.tui.app.config import AppConfig, ChatSettings

    def make(address: str, **kw: object) -> AppConfig:
        settings = kw.pop("settings", ChatSettings(max_new_tokens=24))
        return AppConfig(
            trunk=address, model=str(chat_model), data_dir=tmp_path / "data", log_file=tmp_path / "chat.log",
            animations=False, settings=settings, **kw,  # type: ignore[arg-type]
        )

    return make


async def wait_until(pilot: object, predicate: Callable[[], bool], timeout: float = 60.0,
                     what: str = "condition") -> None:
    """Let the app run until ``predicate()`` holds (checked after each pause), or fail."""
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await pilot.pause(0.05)  # type: ignore[attr-defined]


AsyncCheck = Callable[[], Awaitable[None]]


async def wait_loaded(pilot: object, app: object, timeout: float = 90.0) -> None:
    await wait_until(pilot, lambda: app.engine.loaded and not app.chat_screen().starting,  # type: ignore[attr-defined]
                     timeout, "the engine to load")


async def send(pilot: object, app: object, text: str) -> None:
    """Type ``text`` into the prompt and press Enter, as a person would."""
    from textual.widgets import Input

    app.chat_screen().query_one("#prompt", Input).focus()  # type: ignore[attr-defined]
    await pilot.press(*text, "enter")  # type: ignore[attr-defined]


async def wait_reply(pilot: object, app: object, messages: int, timeout: float = 90.0) -> None:
    """Until the chat holds ``messages`` messages and no reply is running."""
    chat = app.chat_screen()  # type: ignore[attr-defined]
    await wait_until(pilot, lambda: not chat.generating and len(chat.messages) >= messages, timeout,
                     f"{messages} messages")
