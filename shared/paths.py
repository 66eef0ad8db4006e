"""Where things live: the daemon's default socket, and how addresses are written and read."""

from __future__ import annotations

import ipaddress
import os
import warnings
from pathlib import Path

import platformdirs

APP = "splitlm"


def runtime_dir() -> Path:
    """``$RUNTIME_DIRECTORY`` under systemd (``/run/splitlm``), else the user's runtime dir."""
    under_systemd = os.environ.get("RUNTIME_DIRECTORY")
    if under_systemd:
        return Path(under_systemd.split(":")[0])
    with warnings.catch_warnings():
        # without $XDG_RUNTIME_DIR (root over a plain ssh or in a container) platformdirs falls
        # back to /tmp/runtime-$UID and warns on every command; the fallback is what we want
        warnings.simplefilter("ignore")
        return Path(platformdirs.user_runtime_dir(APP))


def default_address() -> str:
    """The daemon's default listen address and the client's default target."""
    return f"unix:{runtime_dir() / 'trunk.sock'}"


def unix_path(address: str) -> Path | None:
    """The socket path of a ``unix:`` address, else None."""
    if address.startswith("unix://"):
        return Path(address[len("unix://") :])
    if address.startswith("unix:"):
        return Path(address[len("unix:") :])
    return None


def is_loopback(address: str) -> bool:
    """``unix:``, 127.0.0.0/8, ``::1`` and ``localhost`` are loopback."""
    if unix_path(address) is not None:
        return True
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def model_cache_dir() -> Path | None:
    """Where converted models are cached (see ``models.gguf_cache``), or None when caching is off.

    ``SPLITLM_NO_CACHE=1`` turns the cache off; ``SPLITLM_CACHE_DIR`` moves it; under systemd
    ``$CACHE_DIRECTORY`` (``/var/cache/splitlm``, the unit's CacheDirectory) is used, since the
    hardened unit cannot write a home directory; else platformdirs' user cache dir
    (``~/.cache/splitlm`` on Linux). The ``models`` folder under it holds the entries.
    """
    if os.environ.get("SPLITLM_NO_CACHE", "").strip().lower() not in ("", "0", "false", "no"):
        return None
    explicit = os.environ.get("SPLITLM_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser() / "models"
    under_systemd = os.environ.get("CACHE_DIRECTORY")
    if under_systemd:
        return Path(under_systemd.split(":")[0]) / "models"
    return Path(platformdirs.user_cache_dir(APP)) / "models"
