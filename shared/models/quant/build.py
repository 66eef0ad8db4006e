"""Compile ``kernel.c`` once per machine with the system C compiler and load it with ctypes.

Why not ``torch.utils.cpp_extension``: it needs torch's headers and a C++ compile of about a
minute, where this plain C file compiles in about a second; the kernel needs nothing from torch but
OpenMP, and the library links ``libgomp.so.1``, the soname torch's own bundled copy carries, so
once torch is imported both share one OpenMP runtime (one thread pool, one wait policy).

The library is cached under the user cache dir, keyed by the source, the compiler's version, the
flags and the CPU's feature flags (``-march=native`` bakes them in), so a daemon and a client on one
machine load the same file. Two processes may build at the same moment: each compiles to its own
temporary file and renames it into place, which is atomic; whichever rename lands last wins, and
both files are the same.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from splitlm.shared.errors import UsageError
from splitlm.shared.paths import model_cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernel.c")
"""The kernel's C source, shipped as package data."""

FLAGS = ("-O3", "-fPIC", "-shared", "-fopenmp", "-std=c11")
"""Compiler flags besides the target; ``-march`` is chosen per build (native by default)."""


class KernelBuildError(UsageError):
    """No C compiler, or the kernel does not compile here: quantized weights cannot run."""


@dataclass(frozen=True)
class Kernel:
    """A loaded kernel library.

    Attributes:
        lib: the ctypes handle, with ``splitlm_quant_linear`` typed.
        path: the shared object it was loaded from.
        isa: which code path was compiled in: ``avx512``, ``avx2`` or ``scalar``.
        compiled: whether this load compiled it (False when the cache had it).
    """

    lib: ctypes.CDLL
    path: Path
    isa: str
    compiled: bool


def _compiler() -> str:
    cc = os.environ.get("CC", "cc")
    found = shutil.which(cc) or shutil.which("gcc")
    if found is None:
        raise KernelBuildError(
            f"quantized weights need a C compiler to build their kernel, and `{cc}` is not on "
            "PATH: install gcc (Debian/Ubuntu: `apt-get install gcc`), set CC, or use "
            "--weights float32/bfloat16"
        )
    return found


def _compiler_version(cc: str) -> str:
    try:
        done = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise KernelBuildError(f"the C compiler {cc} does not run: {e}") from e
    return done.stdout.splitlines()[0] if done.stdout else cc


def _cpu_flags() -> str:
    """The CPU's feature flags (``-march=native`` depends on them), or the machine name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.machine() + platform.processor()


def cache_dir() -> Path:
    """Where built kernels live: ``kernels/`` beside the model cache, or a per-user temp dir.

    With the model cache turned off (``SPLITLM_NO_CACHE=1``) the kernel still has to live in a
    file, so it goes under the system temp dir instead.
    """
    models = model_cache_dir()
    if models is not None:
        return models.parent / "kernels"
    shared_tmp = Path(tempfile.gettempdir()) / f"splitlm-kernels-{os.getuid()}"
    try:
        shared_tmp.mkdir(mode=0o700, exist_ok=True)
        st = shared_tmp.stat()
        if st.st_uid == os.getuid() and not st.st_mode & 0o022:
            return shared_tmp
    except OSError:
        pass
    # someone else's folder under that name (a library loaded from it would run their code)
    return Path(tempfile.mkdtemp(prefix="splitlm-kernels-"))


def _target_flag(march: str) -> str:
    return f"-march={march}" if platform.machine() in ("x86_64", "AMD64", "i686") else f"-mcpu={march}"


def build(march: str = "native", directory: Path | None = None) -> Kernel:
    """The kernel library for ``march``, compiled now unless the cache has it.

    Args:
        march: the compiler's target (``native``; ``x86-64-v3`` gives the AVX2 path and
            ``x86-64`` the portable one, which the tests use to cover those paths here).
        directory: where to cache it (default ``cache_dir()``).

    Raises:
        KernelBuildError: no compiler, or the compile failed (its output is in the message).
    """
    cc = _compiler()
    source = SOURCE.read_bytes()
    flags = (*FLAGS, _target_flag(march))
    key = hashlib.sha256(
        b"\0".join([source, _compiler_version(cc).encode(), " ".join(flags).encode(),
                    _cpu_flags().encode()])
    ).hexdigest()[:24]
    directory = directory or cache_dir()
    target = directory / f"quant-{key}.so"
    compiled = False
    if not target.exists():
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=target.name, suffix=".tmp", dir=directory)
        except OSError as e:
            raise KernelBuildError(
                f"cannot write the quantized-weight kernel to {directory}: {e} (SPLITLM_CACHE_DIR "
                "moves it)"
            ) from e
        os.close(fd)
        start = time.perf_counter()
        try:
            done = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp_name],
                                  capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                raise KernelBuildError(
                    f"the quantized-weight kernel does not compile with {cc} {' '.join(flags)}:\n"
                    f"{done.stderr.strip()[-2000:]}"
                )
            os.replace(tmp_name, target)
        except OSError as e:
            raise KernelBuildError(f"cannot build the quantized-weight kernel in {directory}: {e}") from e
        finally:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)
        compiled = True
        log.info("built the quantized-weight kernel %s in %.1f s", target, time.perf_counter() - start)
    lib = _load(target)
    return Kernel(lib=lib, path=target, isa=lib.splitlm_quant_isa().decode(), compiled=compiled)


def _load(path: Path) -> ctypes.CDLL:
    import torch  # noqa: F401  # loads torch's libgomp.so.1 first, so the kernel shares it

    lib = ctypes.CDLL(str(path))
    lib.splitlm_quant_isa.restype = ctypes.c_char_p
    lib.splitlm_quant_isa.argtypes = []
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.splitlm_quant_linear.restype = ctypes.c_int
    lib.splitlm_quant_linear.argtypes = [
        ctypes.c_int, ptr, i64, i64, i64, i64, ptr, i64, i64, ptr, ptr, i64, ctypes.c_int,
    ]
    lib.splitlm_quant_layer_run.restype = ctypes.c_int
    lib.splitlm_quant_layer_run.argtypes = [ptr, ptr, i64, ptr, ctypes.c_int]
    return lib


class LayerArgs(ctypes.Structure):
    """``struct splitlm_quant_layer``: a layer's fixed arguments, passed by pointer."""

    _fields_ = [
        ("fmt", ctypes.c_int64),
        ("w", ctypes.c_void_p),
        ("wstride", ctypes.c_int64),
        ("out", ctypes.c_int64),
        ("nblocks", ctypes.c_int64),
        ("bias", ctypes.c_void_p),
        ("group_blocks", ctypes.c_int64),
    ]


_lock = threading.Lock()
_loaded: dict[str, Kernel] = {}


def kernel(march: str = "native") -> Kernel:
    """The process's kernel for ``march``, built or loaded on first use (thread-safe)."""
    with _lock:
        found = _loaded.get(march)
        if found is None:
            found = _loaded[march] = build(march)
        return found
