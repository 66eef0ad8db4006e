"""The GGUF model cache (``shared/models/gguf_cache.py``): a hit gives what the uncached parse
gives, a bad entry is rebuilt, concurrent builders both succeed, a changed file gets a new entry.

The first group converts the real SmolLM2 GGUF (a cold conversion takes tens of seconds here);
the rest drive the cache's pieces directly on small data.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from splitlm.shared.models.gguf_cache import GgufCacheEntry, TensorWriter

PROMPTS = ["Hi", "Hello, world! 123  spaces\tand\nlines", "émoji 🙂 and 中文", " leading space", ""]
WANTED = ("model.embed_tokens.weight", "model.layers.0.", "model.layers.29.", "model.norm.weight")


def _wanted(name: str) -> bool:
    return name.startswith(WANTED)


def _skeleton(config: Any) -> torch.nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config)


def _snapshot(spec: str) -> dict[str, Any]:
    """Everything a start takes from the model: digests, tokens, chat template ids, EOS, tensors."""
    from splitlm.shared.models import resolve

    source = resolve(spec)
    tok = source.load_tokenizer()
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=True)
    return {
        "config": source.config_digest(),
        "weights": source.weights_digest(),
        "config_dict": {k: v for k, v in source.config.to_dict().items() if k != "transformers_version"},
        "tokens": [tok.encode(p) for p in PROMPTS],
        "chat": list(chat["input_ids"] if isinstance(chat, dict) or hasattr(chat, "keys") else chat),
        "decoded": tok.decode(list(range(0, 49152, 97))),
        "special": tok.special_tokens_map,
        "eos": source.generation_eos(),
        "tensors": dict(source.iter_tensors(_wanted, _skeleton(source.config), torch.float32)),
        "cache": source._cache,
    }


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="module")
def snapshots(smollm2_path: Path, cache_root: Path) -> Iterator[dict[str, dict[str, Any]]]:
    """The uncached parse, then a cold start (converting) and a warm one (reading the cache)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("SPLITLM_NO_CACHE", "1")
    uncached = _snapshot(str(smollm2_path))
    mp.delenv("SPLITLM_NO_CACHE")
    mp.setenv("SPLITLM_CACHE_DIR", str(cache_root))
    cold = _snapshot(str(smollm2_path))
    warm = _snapshot(str(smollm2_path))
    yield {"uncached": uncached, "cold": cold, "warm": warm}
    mp.undo()


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    for key in ("config", "weights", "config_dict", "tokens", "chat", "decoded", "special", "eos"):
        assert a[key] == b[key], key
    assert a["tensors"].keys() == b["tensors"].keys()
    for name, t in a["tensors"].items():
        assert t.dtype == b["tensors"][name].dtype and torch.equal(t, b["tensors"][name]), name


@pytest.mark.slow
@pytest.mark.realmodel
class TestCacheHit:
    def test_uncached_parse_uses_no_cache(self, snapshots: dict[str, dict[str, Any]]) -> None:
        assert snapshots["uncached"]["cache"] is None
        assert len(snapshots["uncached"]["tensors"]) == 1 + 9 + 9 + 1

    def test_cold_start_fills_every_piece(self, snapshots: dict[str, dict[str, Any]]) -> None:
        entry: GgufCacheEntry = snapshots["cold"]["cache"]
        assert entry.load_config() is not None
        assert (entry.folder / "tokenizer" / "tokenizer.json").is_file()
        assert entry.tensor_file() is not None
        assert not [p for p in entry.folder.iterdir() if p.name.startswith(".")]  # no temp files left

    def test_cold_and_warm_give_what_the_uncached_parse_gives(self, snapshots: dict[str, dict[str, Any]]) -> None:
        _same(snapshots["uncached"], snapshots["cold"])
        _same(snapshots["uncached"], snapshots["warm"])

    def test_warm_start_parses_no_gguf(
        self, snapshots: dict[str, dict[str, Any]], smollm2_path: Path, cache_root: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        import gguf

        def refuse(*a: object, **k: object) -> None:
            raise AssertionError("the GGUF was parsed on a warm start")

        monkeypatch.setenv("SPLITLM_CACHE_DIR", str(cache_root))
        monkeypatch.setattr(gguf, "GGUFReader", refuse)
        monkeypatch.setattr(gguf.gguf_reader, "GGUFReader", refuse)
        _same(snapshots["uncached"], _snapshot(str(smollm2_path)))

    def test_corrupt_pieces_are_rebuilt(
        self, snapshots: dict[str, dict[str, Any]], smollm2_path: Path, cache_root: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        entry: GgufCacheEntry = snapshots["cold"]["cache"]
        (entry.folder / "config.json").write_text("{not json")
        (entry.folder / "tokenizer" / "tokenizer.json").write_text('{"truncated": ')
        tensors = entry.tensors_path
        with tensors.open("r+b") as fh:
            fh.truncate(tensors.stat().st_size // 2)
        monkeypatch.setenv("SPLITLM_CACHE_DIR", str(cache_root))
        rebuilt = _snapshot(str(smollm2_path))
        _same(snapshots["uncached"], rebuilt)
        assert entry.load_config() is not None
        assert entry.load_tokenizer(snapshots["warm"]["cache"].load_config()) is not None
        assert entry.tensor_file() is not None


@pytest.mark.slow
@pytest.mark.realmodel
def test_two_processes_building_one_entry_both_succeed(smollm2_path: Path, tmp_path: Path) -> None:
    code = (
        "import sys, torch\n"
        "from splitlm.shared.models import resolve, PartSpec, build_part, family_for\n"
        "s = resolve(sys.argv[1]); t = s.load_tokenizer()\n"
        "p = build_part(s, family_for(s.config), PartSpec.bottom(2), torch.float32, torch.device('cpu'))\n"
        "print(s.config_digest(), t.encode('Hi'), float(p.model.model.embed_tokens.weight.sum()))\n"
    )
    env = dict(os.environ, SPLITLM_CACHE_DIR=str(tmp_path), OMP_NUM_THREADS="1")
    env.pop("SPLITLM_NO_CACHE", None)
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(smollm2_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert outs[0][0] == outs[1][0]
    (folder,) = (tmp_path / "models").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "tensors.safetensors", "tokenizer"]
    again = subprocess.run([sys.executable, "-c", code, str(smollm2_path)], env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout == outs[0][0]


# -- the pieces, on small data ---------------------------------------------------------------


def _entry(tmp_path: Path, **identity: Any) -> GgufCacheEntry:
    return GgufCacheEntry(tmp_path / "entry", {"format": 1, "path": "x.gguf", **identity})


def _write(entry: GgufCacheEntry, arrays: dict[str, np.ndarray]) -> None:
    w = TensorWriter(entry, len(arrays), sum(len(n) + 2 for n in arrays))
    for name, a in arrays.items():
        w.add(name, a)
    w.commit()


ARRAYS = {
    "a.weight": np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
    "b.bias": np.arange(5, dtype=np.float16),
    "c.weight": np.random.default_rng(0).standard_normal((64, 300)).astype(np.float32),
}


def test_tensor_file_round_trips_exactly(tmp_path: Path) -> None:
    from safetensors import safe_open

    entry = _entry(tmp_path)
    _write(entry, ARRAYS)
    path = entry.tensor_file()
    assert path is not None
    with safe_open(str(path), framework="np") as st:
        assert sorted(st.keys()) == sorted(ARRAYS)
        for name, a in ARRAYS.items():
            got = st.get_tensor(name)
            assert got.dtype == a.dtype and np.array_equal(got, a)


@pytest.mark.parametrize("damage", ["truncate", "flip", "header", "empty", "identity"])
def test_damaged_tensor_file_is_refused_and_removed(tmp_path: Path, damage: str) -> None:
    entry = _entry(tmp_path)
    _write(entry, ARRAYS)
    path = entry.tensors_path
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(data[: len(data) - 100])
    elif damage == "flip":
        data[-5000] ^= 0xFF
        path.write_bytes(data)
    elif damage == "header":
        data[20:30] = b"##########"
        path.write_bytes(data)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        entry = _entry(tmp_path, size=1)  # same folder, another file's identity
    assert entry.tensor_file() is None
    assert not path.exists()


def test_damaged_config_and_tokenizer_are_refused(tmp_path: Path) -> None:
    from transformers import LlamaConfig

    entry = _entry(tmp_path)
    entry.store_config(LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4))
    assert entry.load_config() is not None
    assert _entry(tmp_path, size=1).load_config() is None  # stale: another identity
    (entry.folder / "config.json").write_text('{"identity": ')
    assert entry.load_config() is None
    (entry.folder / "tokenizer").mkdir()
    (entry.folder / "tokenizer" / "splitlm-cache.json").write_text(json.dumps({"identity": entry.identity}))
    assert entry.load_tokenizer(LlamaConfig()) is None  # marker, but no tokenizer files


def test_oversized_header_reservation_is_not_exceeded(tmp_path: Path) -> None:
    """The header area is reserved before the shapes are known: the bound holds for long names
    and four-dimensional shapes."""
    entry = _entry(tmp_path, path="/" + "p" * 3000)
    arrays = {("n" * 200) + str(i): np.zeros((1, 2, 3, 4), np.float32) for i in range(50)}
    _write(entry, arrays)
    path = entry.tensor_file()
    assert path is not None
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert n % 8 == 0


def test_key_changes_when_the_file_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPLITLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SPLITLM_NO_CACHE", raising=False)
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + bytes(100))
    first = GgufCacheEntry.for_file(f, "d1")
    assert first is not None and first.folder.parent == tmp_path / "cache" / "models"
    assert GgufCacheEntry.for_file(f, "d1").folder == first.folder  # type: ignore[union-attr]
    assert GgufCacheEntry.for_file(f, "d2").folder != first.folder  # type: ignore[union-attr]
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    touched = GgufCacheEntry.for_file(f, "d1")
    assert touched is not None and touched.folder != first.folder
    f.write_bytes(b"GGUF" + bytes(101))
    assert GgufCacheEntry.for_file(f, "d1").folder not in (first.folder, touched.folder)  # type: ignore[union-attr]
    moved = tmp_path / "sub"
    moved.mkdir()
    g = moved / "m.gguf"
    g.write_bytes(f.read_bytes())
    os.utime(g, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns))
    assert GgufCacheEntry.for_file(g, "d1").folder != GgufCacheEntry.for_file(f, "d1").folder  # type: ignore[union-attr]


def test_cache_can_be_turned_off_or_moved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from splitlm.shared import paths

    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    monkeypatch.setenv("SPLITLM_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.setenv("SPLITLM_NO_CACHE", "1")
    assert paths.model_cache_dir() is None
    assert GgufCacheEntry.for_file(f, "d") is None
    monkeypatch.setenv("SPLITLM_NO_CACHE", "0")
    assert paths.model_cache_dir() == tmp_path / "c" / "models"
    monkeypatch.delenv("SPLITLM_CACHE_DIR")
    monkeypatch.setenv("CACHE_DIRECTORY", str(tmp_path / "systemd"))
    assert paths.model_cache_dir() == tmp_path / "systemd" / "models"


def test_unwritable_cache_is_skipped_not_fatal(tmp_path: Path) -> None:
    from transformers import LlamaConfig

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    entry = GgufCacheEntry(blocker / "entry", {"format": 1})
    entry.store_config(LlamaConfig())  # logs, does not raise
    assert entry.load_config() is None
    assert entry.tensor_writer(1, 10) is None
