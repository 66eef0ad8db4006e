"""A GGUF file converted once: its config, tokenizer and dequantised tensors, read directly later.

Parsing a GGUF's metadata with the ``gguf`` package walks every vocabulary entry through numpy
views (seconds for a 49k-token vocabulary, once each for the config, the tokenizer and the
tensors), and dequantising the weights costs seconds more. Each start repeated all of it. An
entry holds what those steps produce, in formats that load in milliseconds:

- ``config.json``: the transformers config (``to_dict``), rebuilt with ``AutoConfig.for_model``;
- ``tokenizer/``: the tokenizer's own ``save_pretrained`` files (``tokenizer.json``...);
- ``tensors.safetensors``: every tensor as the uncached path yields it before the cast to the
  part's dtype (dequantised, renamed to transformers' names, processed), read selectively from a
  memory map so each side still materialises only its own part's weights.

The entry's name is a digest of the file's identity (resolved path, size, ``mtime_ns``, the weights
digest) and of what converts it (this format, transformers' and gguf's versions): a changed file or
library gives a new entry, never a stale one. Each piece is written to a temporary name in the
entry's folder and renamed into place, so a reader sees a whole piece or none, and two processes
building one entry both succeed (the last rename wins; both wrote the same bytes). A piece that
fails its check (unreadable, another identity, truncated, sampled bytes changed) is rebuilt; a
cache that cannot be written (read-only disk, full disk) is logged and skipped, never fatal.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from .. import paths

if TYPE_CHECKING:
    import numpy as np
    import torch
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

FORMAT = 1
"""Bump when an entry's layout or content changes: old entries then stop matching."""

MAX_TENSOR_BYTES = 4 << 30
"""Dequantised tensors above this size are not cached (a 7B model would take 28 GB of disk in
float32); such a model still caches its config and tokenizer and dequantises at each start."""

_MARKER = "splitlm-cache.json"
_SAFETENSORS_DTYPE = {
    "float32": "F32", "float16": "F16", "float64": "F64",
    "int8": "I8", "int16": "I16", "int32": "I32", "int64": "I64", "uint8": "U8",
}


def _sampled_digest(fh: IO[bytes], start: int, end: int) -> str:
    """Digest of 16 evenly spaced 64 KiB chunks of ``[start, end)``: catches truncation and most
    overwritten data for a millisecond of reading, where hashing every byte would cost seconds."""
    h = hashlib.sha256()
    size = end - start
    for k in range(16):
        fh.seek(start + size * k // 16)
        h.update(fh.read(min(1 << 16, end - (start + size * k // 16))))
    return h.hexdigest()[:16]


class GgufCacheEntry:
    """The cached conversion of one GGUF file (one folder under the cache dir).

    Safe to use from several processes at once; each method either returns a checked piece or
    None (absent or bad: the caller converts again and stores).
    """

    def __init__(self, folder: Path, identity: dict[str, Any]) -> None:
        self.folder = folder
        self.identity = identity

    @classmethod
    def for_file(cls, path: Path, weights_digest: str) -> GgufCacheEntry | None:
        """The entry for ``path``, or None when caching is off (``SPLITLM_NO_CACHE``)."""
        root = paths.model_cache_dir()
        if root is None:
            return None
        st = path.stat()
        identity = {
            "format": FORMAT,
            "path": str(path.resolve()),
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "weights": weights_digest,
            "transformers": metadata.version("transformers"),
            "gguf": metadata.version("gguf"),
        }
        key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
        return cls(root / f"{path.stem}-{key}", identity)

    # -- writing -----------------------------------------------------------------------------

    @contextmanager
    def _atomic(self, name: str) -> Iterator[IO[bytes]]:
        """A file open for writing that appears as ``name`` only once closed whole (temp + rename)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.folder / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _marker(self) -> str:
        return json.dumps({"identity": self.identity}, sort_keys=True)

    def _matches(self, text: str) -> bool:
        return bool(json.loads(text).get("identity") == self.identity)

    # -- config --------------------------------------------------------------------------------

    def load_config(self) -> PretrainedConfig | None:
        path = self.folder / "config.json"
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            if data.get("identity") != self.identity:
                raise ValueError("another file's identity")
            from transformers import AutoConfig

            config = AutoConfig.for_model(**data["config"])
        except Exception as e:  # noqa: BLE001 - any damage means the same: convert again
            log.warning("model cache: %s is unusable (%s); converting again", path, e)
            return None
        return config

    def store_config(self, config: PretrainedConfig) -> None:
        text = json.dumps({"identity": self.identity, "config": config.to_dict()}, sort_keys=True, default=str)
        self._store("config.json", lambda fh: fh.write(text.encode()))

    def _store(self, name: str, write: Any) -> None:
        try:
            with self._atomic(name) as fh:
                write(fh)
        except OSError as e:
            log.warning("model cache: could not write %s in %s (%s); going on without it", name, self.folder, e)

    # -- tokenizer -----------------------------------------------------------------------------

    def load_tokenizer(self, config: PretrainedConfig) -> PreTrainedTokenizerBase | None:
        folder = self.folder / "tokenizer"
        marker = folder / _MARKER
        if not marker.is_file():
            return None
        try:
            if not self._matches(marker.read_text()):
                raise ValueError("another file's identity")
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(folder), config=config)
        except Exception as e:  # noqa: BLE001 - any damage means the same: convert again
            log.warning("model cache: %s is unusable (%s); converting again", folder, e)
            return None

    def store_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Save into a temporary folder, then rename it into place (a folder cannot be replaced
        while it holds files, so a bad one is moved aside first)."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=self.folder, prefix=".tokenizer."))
            try:
                tokenizer.save_pretrained(str(tmp))
                (tmp / _MARKER).write_text(self._marker())  # last: its presence means complete
                target = self.folder / "tokenizer"
                if target.exists():
                    aside = Path(tempfile.mkdtemp(dir=self.folder, prefix=".stale."))
                    try:
                        os.replace(target, aside / "tokenizer")
                    except OSError:
                        pass  # another process moved it first
                    shutil.rmtree(aside, ignore_errors=True)
                try:
                    os.replace(tmp, target)
                except OSError:
                    pass  # another process put its (identical) copy there first
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError as e:
            log.warning("model cache: could not write the tokenizer in %s (%s); going on without it", self.folder, e)

    # -- tensors -------------------------------------------------------------------------------

    @property
    def tensors_path(self) -> Path:
        return self.folder / "tensors.safetensors"

    def tensor_file(self) -> Path | None:
        """The tensors file if it is complete and this entry's, else None (a bad one is removed)."""
        path = self.tensors_path
        if not path.is_file():
            return None
        try:
            with path.open("rb") as fh:
                head = fh.read(8)
                if len(head) < 8:
                    raise ValueError("shorter than its header")
                (n,) = struct.unpack("<Q", head)
                header = json.loads(fh.read(n))
                meta = header.pop("__metadata__", {})
                if json.loads(meta.get("splitlm", "{}")).get("identity") != self.identity:
                    raise ValueError("another file's identity")
                end = max((v["data_offsets"][1] for v in header.values()), default=0)
                size = path.stat().st_size
                if size != 8 + n + end:
                    raise ValueError(f"{size} bytes where the header says {8 + n + end}")
                if _sampled_digest(fh, 8 + n, size) != meta.get("sampled"):
                    raise ValueError("its data changed since it was written")
        except Exception as e:  # noqa: BLE001 - any damage means the same: convert again
            log.warning("model cache: %s is unusable (%s); converting again", path, e)
            path.unlink(missing_ok=True)
            return None
        return path

    def tensor_writer(self, count: int, names_bytes: int) -> TensorWriter | None:
        """A writer for ``count`` tensors whose names total ``names_bytes``; None if it cannot start."""
        try:
            return TensorWriter(self, count, names_bytes)
        except OSError as e:
            log.warning("model cache: cannot write tensors in %s (%s); going on without", self.folder, e)
            return None


class TensorWriter:
    """Streams tensors into a safetensors file without holding them all in memory.

    Data goes after a header area reserved from a bound on its size (names, shapes and offsets of
    ``count`` tensors); the header is written last, padded with spaces (which safetensors allows).
    ``commit`` renames the file into place; ``abort`` (or a failed write) leaves nothing behind.
    """

    def __init__(self, entry: GgufCacheEntry, count: int, names_bytes: int) -> None:
        self.entry = entry
        entry.folder.mkdir(parents=True, exist_ok=True)
        self.reserved = (names_bytes + 256 * count + 2 * len(entry._marker()) + 1024 + 7) // 8 * 8
        fd, self.tmp = tempfile.mkstemp(dir=entry.folder, prefix=".tensors.", suffix=".tmp")
        self.fh: IO[bytes] | None = os.fdopen(fd, "wb")
        self.fh.seek(8 + self.reserved)
        self.header: dict[str, Any] = {}
        self.offset = 0
        self.nbytes = 0

    def add(self, name: str, array: np.ndarray) -> None:
        """Append one tensor; on a dtype safetensors cannot hold or a full disk, give up quietly."""
        if self.fh is None:
            return
        dtype = _SAFETENSORS_DTYPE.get(str(array.dtype))
        self.nbytes += array.nbytes
        if dtype is None or self.nbytes > MAX_TENSOR_BYTES:
            reason = f"dtype {array.dtype}" if dtype is None else f"over {MAX_TENSOR_BYTES >> 30} GiB"
            log.info("model cache: tensors not cached (%s)", reason)
            self.abort()
            return
        import numpy as np

        data = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        try:
            self.fh.write(data)
        except OSError as e:
            log.warning("model cache: could not write tensors (%s); going on without", e)
            self.abort()
            return
        self.header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [self.offset, self.offset + len(data)]}
        self.offset += len(data)

    def commit(self) -> None:
        if self.fh is None:
            return
        fh = self.fh
        try:
            fh.flush()
            with open(self.tmp, "rb") as rd:
                sampled = _sampled_digest(rd, 8 + self.reserved, 8 + self.reserved + self.offset)
            meta = {"splitlm": self.entry._marker(), "sampled": sampled}
            text = json.dumps({"__metadata__": meta, **self.header}, separators=(",", ":")).encode()
            if len(text) > self.reserved:
                log.warning("model cache: tensor header larger than reserved (%d > %d); not cached", len(text), self.reserved)
                self.abort()
                return
            fh.seek(0)
            fh.write(struct.pack("<Q", self.reserved) + text + b" " * (self.reserved - len(text)))
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
            self.fh = None
            os.replace(self.tmp, self.entry.tensors_path)
        except OSError as e:
            log.warning("model cache: could not write tensors (%s); going on without", e)
            self.abort()

    def abort(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None
        Path(self.tmp).unlink(missing_ok=True)


def iter_cached_tensors(path: Path, wanted: Any, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for the cached tensors ``wanted`` keeps; the rest are never read."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as st:
        for name in st.keys():
            if wanted(name):
                yield name, st.get_tensor(name).to(dtype)
