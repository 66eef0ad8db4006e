"""Layered settings for the daemon and the client: flags > environment > TOML file > defaults.

Each program's settings are one frozen dataclass (``DaemonSettings``, ``ClientSettings``) whose
fields declare, with ``setting(...)``, their default, how a raw value is read and what is allowed.
``load`` builds one from the four layers and remembers, per key, where the value came from, so
``splitlm-trunkd --print-config`` can show it and a bad value can be reported as
``max_sessions = '0' from SPLITLM_MAX_SESSIONS: allowed: an integer >= 1``.

Names: the key ``max_sessions`` is the flag ``--max-sessions``, the environment variable
``SPLITLM_MAX_SESSIONS`` and the TOML key ``max_sessions``.

The TOML file: ``--config PATH`` when given (it must exist); for the daemon under systemd
``$CONFIGURATION_DIRECTORY/trunkd.toml`` (``/etc/splitlm/trunkd.toml`` with the unit's
``ConfigurationDirectory=splitlm``; or ``/etc/splitlm/trunkd.toml`` when it exists and
``INVOCATION_ID`` says systemd started us);
otherwise platformdirs' user config dir (``~/.config/splitlm/trunkd.toml`` or ``client.toml``).
A default file that does not exist is simply skipped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import platformdirs

from .errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

APP = "splitlm"
ENV_PREFIX = "SPLITLM_"
SYSTEM_CONFIG_DIR = Path("/etc/splitlm")
DEFAULT = "default"
"""The source name of a value nobody set."""


class ConfigError(UsageError):
    """A setting's value is not allowed, or the config file cannot be read (exit code 2)."""


# ---- readers: a raw value from any layer (str from flags/env, typed from TOML) to the typed value


class Reader:
    """Reads one raw value; ``allowed`` says in words what it accepts (for error messages)."""

    allowed = "a value"

    def __call__(self, raw: object) -> Any:
        raise NotImplementedError


class Text(Reader):
    allowed = "a non-empty string"

    def __call__(self, raw: object) -> str:
        if not isinstance(raw, str) or not raw.strip():
            raise ValueError
        return raw.strip()


class PathValue(Reader):
    allowed = "a file path"

    def __call__(self, raw: object) -> Path:
        if not isinstance(raw, (str, Path)) or not str(raw).strip():
            raise ValueError
        return Path(str(raw).strip()).expanduser()


class Choice(Reader):
    def __init__(self, *options: str, fold_case: bool = False) -> None:
        self.options = options
        self.fold_case = fold_case
        self.allowed = "one of " + ", ".join(options)

    def __call__(self, raw: object) -> str:
        if not isinstance(raw, str):
            raise ValueError
        value = raw.strip().upper() if self.fold_case else raw.strip()
        if value not in self.options:
            raise ValueError
        return value


class Integer(Reader):
    def __init__(self, minimum: int = 1) -> None:
        self.minimum = minimum
        self.allowed = f"an integer >= {minimum}"

    def __call__(self, raw: object) -> int:
        if isinstance(raw, bool):
            raise ValueError
        if isinstance(raw, str) and re.fullmatch(r"\s*[+-]?\d+\s*", raw):
            raw = int(raw)
        if not isinstance(raw, int) or raw < self.minimum:
            raise ValueError
        return raw


class Boolean(Reader):
    allowed = "true or false (also 1/0, yes/no, on/off)"
    _WORDS = {
        "true": True,
        "1": True,
        "yes": True,
        "on": True,
        "false": False,
        "0": False,
        "no": False,
        "off": False,
    }

    def __call__(self, raw: object) -> bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in self._WORDS:
            return self._WORDS[raw.strip().lower()]
        raise ValueError


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


class ByteSize(Reader):
    """Bytes, as an integer or with a unit (``512MiB``, ``16GiB``, ``2G``); maybe ``auto``."""

    def __init__(self, minimum: int = 1, auto: bool = False) -> None:
        self.minimum = minimum
        self.auto = auto
        self.allowed = f"a size in bytes >= {minimum} such as 1048576, 512MiB or 16GiB" + (
            ", or auto" if auto else ""
        )

    def __call__(self, raw: object) -> int | str:
        if self.auto and isinstance(raw, str) and raw.strip().lower() == "auto":
            return "auto"
        if isinstance(raw, bool):
            raise ValueError
        if isinstance(raw, str):
            m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", raw)
            if not m or m.group(2).lower() not in _SIZE_UNITS:
                raise ValueError
            raw = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
        if not isinstance(raw, int) or raw < self.minimum:
            raise ValueError
        return raw


_DURATION_UNITS = {"": 1.0, "s": 1.0, "ms": 1e-3, "m": 60.0, "min": 60.0, "h": 3600.0}


class Duration(Reader):
    """Seconds, as a number or with a unit (``500ms``, ``30s``, ``10m``, ``1h``)."""

    def __init__(self, minimum: float = 0.0, zero_means: str = "") -> None:
        self.minimum = minimum
        self.allowed = f"seconds >= {minimum:g} such as 30, 30s, 10m or 1h" + (
            f" (0 {zero_means})" if zero_means else ""
        )

    def __call__(self, raw: object) -> float:
        if isinstance(raw, bool):
            raise ValueError
        if isinstance(raw, str):
            m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", raw.lower())
            if not m or m.group(2) not in _DURATION_UNITS:
                raise ValueError
            raw = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        if not isinstance(raw, (int, float)) or not math.isfinite(raw) or raw < self.minimum:
            raise ValueError
        return float(raw)


class Addresses(Reader):
    """A list of addresses: a TOML array, repeated flags, or a comma-separated string."""

    allowed = "addresses like unix:/path/trunk.sock or host:port (a list, or comma-separated)"

    def __call__(self, raw: object) -> tuple[str, ...]:
        items = raw.split(",") if isinstance(raw, str) else raw
        if not isinstance(items, (list, tuple)):
            raise ValueError
        out = tuple(str(a).strip() for a in items if isinstance(a, str) and a.strip())
        if not out or len(out) != len(items) or not all(_is_address(a) for a in out):
            raise ValueError
        return out


class HostPort(Reader):
    """One TCP address, ``host:port`` (``[::1]:port`` for IPv6)."""

    allowed = "host:port, e.g. 127.0.0.1:9464"

    def __call__(self, raw: object) -> str:
        if not isinstance(raw, str) or raw.strip().startswith("unix:") or not _is_address(raw.strip()):
            raise ValueError
        return raw.strip()


def _is_address(a: str) -> bool:
    if a.startswith("unix:"):
        return len(a) > len("unix:")
    host, sep, port = a.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


def setting(
    default: Any,
    read: Reader,
    help: str,
    *,
    env: str | None = None,
    default_factory: Callable[[], Any] | None = None,
) -> Any:
    """Declare one key of a settings dataclass.

    Args:
        default: the value nobody set; None means "unset" (the program decides).
        read: reads a raw value from a flag, the environment or the file.
        help: one line, for ``--print-config``.
        env: the environment variable when it is not ``SPLITLM_<KEY>``.
        default_factory: computes the default (e.g. from the runtime dir) instead of ``default``.
    """
    meta = {"read": read, "help": help, "env": env}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def _default_listen() -> tuple[str, ...]:
    from .paths import default_address

    return (default_address(),)


def _default_trunk() -> str:
    from .paths import default_address

    return default_address()


_LOG_LEVELS = Choice("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", fold_case=True)
_DTYPES = Choice("auto", "float32", "bfloat16", "float16")
_WEIGHTS = Choice("auto", "float32", "bfloat16", "int8")
_WIRE_DTYPES = Choice("exact", "bfloat16", "float16")


@dataclass(frozen=True)
class DaemonSettings:
    """What ``splitlm-trunkd`` runs with; see the README's "Daemon options" for each key."""

    model: str = setting("smollm2", Text(), "smollm2, a .gguf file, a model directory or a hub id")
    # checked against the model's layer count once it is known (the message names the valid range)
    split: str | None = setting(None, Text(), "trunk layers A:B (unset: the family's default)")
    listen: tuple[str, ...] = setting(
        None, Addresses(), "where to listen", default_factory=_default_listen
    )
    dtype: str = setting("auto", _DTYPES, "compute dtype (auto: float32 on CPU, bfloat16 on GPU)")
    weights: str = setting(
        "auto", _WEIGHTS, "weight precision: float32, bfloat16 or int8 (auto: as --dtype)"
    )
    device: str = setting("auto", Text(), "auto, cpu, cuda or cuda:N")
    threads: int | None = setting(
        None, Integer(1), "torch intra-op threads (unset: torch's choice)"
    )
    max_sessions: int = setting(64, Integer(1), "sessions open at once")
    max_context: int | None = setting(
        None, Integer(1), "positions per session (unset: the model's)"
    )
    max_cache_bytes: int | str = setting(
        "auto",
        ByteSize(1, auto=True),
        "trunk KV cache of all sessions together "
        "(auto: 90% of free GPU memory, half the free RAM on CPU)",
    )
    max_message_bytes: int = setting(
        256 * 2**20, ByteSize(1), "gRPC message size limit, both directions"
    )
    idle_timeout: float = setting(1800.0, Duration(0, "never"), "close a session idle this long")
    shutdown_grace: float = setting(
        10.0, Duration(0), "on SIGTERM, how long in-flight steps may finish"
    )
    keepalive: float = setting(
        30.0, Duration(1), "ping idle connections this often; dead peers are dropped"
    )
    batch: bool = setting(
        False, Boolean(), "run concurrent sessions' decode steps as one batch (equal to float rounding)"
    )
    batch_window: float = setting(
        0.0, Duration(0), "with batch: wait this long for more steps before a batch (0: none)"
    )
    tls_cert: Path | None = setting(
        None, PathValue(), "PEM certificate: serve TCP addresses over TLS"
    )
    tls_key: Path | None = setting(None, PathValue(), "PEM private key of --tls-cert")
    token_file: Path | None = setting(
        None, PathValue(), "file holding the bearer token clients must send"
    )
    insecure: bool = setting(
        False, Boolean(), "allow a non-loopback TCP address without TLS and a token"
    )
    metrics: str | None = setting(
        None, HostPort(), "serve Prometheus metrics over plain HTTP at host:port (unset: off)"
    )
    log_level: str = setting("INFO", _LOG_LEVELS, "logging level")


@dataclass(frozen=True)
class ClientSettings:
    """What ``splitlm`` (CLI and TUI) connects with."""

    trunk: str = setting(
        None, Text(), "the daemon: unix:/path or host:port", default_factory=_default_trunk
    )
    model: str | None = setting(
        None, Text(), "the local model (unset: the daemon's, when it resolves here)"
    )
    token_file: Path | None = setting(None, PathValue(), "file holding the daemon's bearer token")
    tls_ca: Path | None = setting(
        None, PathValue(), "PEM CA (or self-signed) certificate: connect over TLS"
    )
    dtype: str = setting("auto", _DTYPES, "compute dtype of the local parts")
    weights: str = setting(
        "auto", _WEIGHTS, "weight precision here: float32, bfloat16 or int8 (auto: the daemon's)"
    )
    wire_dtype: str = setting(
        "exact", _WIRE_DTYPES, "hidden states on the wire (exact: the trunk's dtype)"
    )
    device: str = setting("auto", Text(), "auto, cpu, cuda or cuda:N")
    threads: int | None = setting(
        None, Integer(1), "torch intra-op threads of the local parts (unset: torch's choice)"
    )
    log_level: str = setting("WARNING", _LOG_LEVELS, "logging level")
    retry_deadline: float = setting(
        180.0, Duration(0, "turns failover off"),
        "when the daemon goes away mid-session, keep reconnecting this long",
    )
    retry_initial: float = setting(
        0.25, Duration(0.01), "first wait before reconnecting; doubles per attempt"
    )
    retry_max_delay: float = setting(2.0, Duration(0.01), "longest wait between two attempts")
    step_deadline: float = setting(
        60.0, Duration(0.1),
        "a step's reply must come within this, plus an allowance per position that grows with "
        "the step latency seen; then reconnect (or fail)",
    )


S = TypeVar("S")


@dataclass(frozen=True)
class Loaded(Generic[S]):
    """Settings with where each value came from.

    Attributes:
        settings: the effective settings.
        sources: per key, ``--flag``, ``SPLITLM_X``, ``<file>`` or ``default``.
        file: the config file read, if any.
        file_note: how the file was chosen (for ``--print-config``).
    """

    settings: S
    sources: Mapping[str, str]
    file: Path | None
    file_note: str

    def source(self, key: str) -> str:
        return self.sources[key]


def env_name(cls: type, key: str) -> str:
    f = {f.name: f for f in dataclasses.fields(cls)}[key]
    return f.metadata.get("env") or ENV_PREFIX + key.upper()


def flag_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def config_file(
    name: str, explicit: str | Path | None, env: Mapping[str, str], system: bool = False
) -> tuple[Path | None, bool, str]:
    """Which TOML file to read.

    Args:
        name: ``trunkd`` or ``client``.
        explicit: ``--config``.
        system: the daemon: prefer ``/etc/splitlm`` (or ``$CONFIGURATION_DIRECTORY``) under systemd.

    Returns:
        The path (None: no file), whether it must exist, and how it was chosen.
    """
    if explicit:
        return Path(explicit).expanduser(), True, "--config"
    filename = f"{name}.toml"
    if system and env.get("CONFIGURATION_DIRECTORY"):
        return (
            Path(env["CONFIGURATION_DIRECTORY"].split(":")[0]) / filename,
            False,
            "systemd ConfigurationDirectory",
        )
    if system and env.get("INVOCATION_ID") and (SYSTEM_CONFIG_DIR / filename).is_file():
        # a unit without ConfigurationDirectory=; only when the file is there, since a desktop
        # terminal run as a systemd user service passes INVOCATION_ID on to its shells too
        return SYSTEM_CONFIG_DIR / filename, False, "started by systemd"
    return Path(platformdirs.user_config_dir(APP)) / filename, False, "user config dir"


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} (from --config) does not exist") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None


def load(
    cls: type[S],
    flags: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
    config: str | Path | None = None,
    file_name: str = "trunkd",
    system: bool = False,
) -> Loaded[S]:
    """Build ``cls`` from flags > environment > TOML file > defaults.

    Args:
        cls: ``DaemonSettings`` or ``ClientSettings``.
        flags: key -> value for the flags the user gave (absent or None: not given).
        env: the environment (``os.environ`` by default); empty ``SPLITLM_X=`` counts as unset.
        config: ``--config``.
        file_name: ``trunkd`` or ``client``.
        system: see ``config_file``.

    Raises:
        ConfigError: a value that is not allowed (naming the key, its source and what is
            allowed), an unknown key in the file, or an unreadable file.
    """
    env = os.environ if env is None else env
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    path, required, note = config_file(file_name, config, env, system)
    table: dict[str, Any] = {}
    if path is not None and (required or path.is_file()):
        table = read_toml(path)
        unknown = sorted(set(table) - set(fields))
        if unknown:
            raise ConfigError(
                f"config file {path}: unknown key{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(unknown)}; known keys: {', '.join(fields)}"
            )
    else:
        path = None
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, f in fields.items():
        read: Reader = f.metadata["read"]
        ename = f.metadata.get("env") or ENV_PREFIX + key.upper()
        layers = (
            (flags.get(key), flag_name(key)),
            (env.get(ename) or None, ename),
            (table.get(key), str(path)),
        )
        for raw, source in layers:
            if raw is None:
                continue
            try:
                values[key] = read(raw)
            except (ValueError, TypeError):
                shown = json.dumps(raw) if not isinstance(raw, Path) else json.dumps(str(raw))
                raise ConfigError(
                    f"{key} = {shown} from {source}: allowed: {read.allowed}"
                ) from None
            sources[key] = source
            break
        else:
            sources[key] = DEFAULT
    loaded = cls(**values)
    return Loaded(loaded, sources, path, note)


def flags_from(args: object, cls: type) -> dict[str, Any]:
    """The keys of ``cls`` that an argparse namespace carries a (non-None) value for.

    The parser's defaults must be None for this to tell "given" from "not given".
    """
    out = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        if value is not None:
            out[f.name] = value
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def render(loaded: Loaded[Any], title: str) -> str:
    """The effective settings as TOML, each line commented with its source.

    Unset keys are commented out, so the output is itself a valid config file.
    """
    s = loaded.settings
    if loaded.file is not None:
        file_line = f"{loaded.file} ({loaded.file_note})"
    else:
        file_line = f"none ({loaded.file_note}: nothing there)"
    lines = [
        f"# {title}",
        f"# config file: {file_line}",
        "# precedence: flags > SPLITLM_* environment > file > defaults",
    ]
    rows = []
    for f in dataclasses.fields(s):
        value = getattr(s, f.name)
        src = loaded.sources[f.name]
        left = f"# {f.name} =" if value is None else f"{f.name} = {_toml_value(value)}"
        rows.append((left, f"{src}{': unset' if value is None else ''} - {f.metadata['help']}"))
    width = max(len(left) for left, _ in rows)
    lines += [f"{left:<{width}}  # {comment}" for left, comment in rows]
    return "\n".join(lines)
