"""Layered settings for the daemon and the client: flags > environment > TOML file > defaults.

Each program's settings are one frozen dataclass (``DaemonSettings``, ``ClientSettings``) whose
fields declare, with ``setting(...)``, their default, how a raw value is read and what is allowed.
``load`` builds one from the four layers and remembers, per key, where the value came from, so
``splitlm-trunkd --print-config`` can show it and a bad value can be reported as
``max_sessions = '0' from SPLITLM_MAX_SESSIONS: allowed: an integer >= 1``.

Names: the key ``max_sessions`` is the flag ``--max-sessions``, the environment variable
``SPLITLM_MAX_SESSIONS`` and the TOML key ``max_sessions``.

This module is also the one registry of options: every option of ``splitlm-trunkd`` and of the
``splitlm`` subcommands is declared once, here (key, reader, default, choices, environment
variable, TOML key, help, the commands that take it), and ``add_flags(parser, command)`` makes
the argparse flags from it. Layered settings are the fields of the two dataclasses; options that
are flags only (sampling, ``--json``, ...) but taken by several commands are ``CLIENT_FLAGS``.
A flag only one command has (``generate --full``, the bench's ``--warmup``) stays with that
command.

The TOML file: ``--config PATH`` when given (it must exist); for the daemon under systemd
``$CONFIGURATION_DIRECTORY/trunkd.toml`` (``/etc/splitlm/trunkd.toml`` with the unit's
``ConfigurationDirectory=splitlm``; or ``/etc/splitlm/trunkd.toml`` when it exists and
``INVOCATION_ID`` says systemd started us);
otherwise platformdirs' user config dir (``~/.config/splitlm/trunkd.toml`` or ``client.toml``).
A default file that does not exist is simply skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

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

    def show(self, value: Any) -> str:
        """``value`` as a user types it (help texts, the command ``chat --serve`` rebuilds); reading
        it back gives ``value`` again."""
        return str(value)


class Text(Reader):
    """A non-empty string, stripped; ``verbatim``: kept as given (a stop string may be ``"\\n"``)."""

    allowed = "a non-empty string"

    def __init__(self, verbatim: bool = False) -> None:
        self.verbatim = verbatim

    def __call__(self, raw: object) -> str:
        if self.verbatim and isinstance(raw, str) and raw:
            return raw
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


class Refused(ValueError):
    """A reader's refusal whose message says more than its ``allowed`` (which value, why):
    argparse shows the message itself."""


class IntList(Reader):
    """Comma-separated integers in ``[minimum, maximum]`` (``1,2,8``), read as a sorted tuple
    without repeats."""

    def __init__(self, minimum: int, maximum: int) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self.allowed = f"comma-separated integers from {minimum} to {maximum} such as {minimum},{maximum}"

    def __call__(self, raw: object) -> tuple[int, ...]:
        items = raw.split(",") if isinstance(raw, str) else raw
        if not isinstance(items, (list, tuple)) or not items:
            raise ValueError
        values = []
        for item in items:
            if isinstance(item, str) and re.fullmatch(r"\s*\+?\d+\s*", item):
                item = int(item)
            if not isinstance(item, int) or isinstance(item, bool):
                raise ValueError
            values.append(item)
        bad = [v for v in sorted(set(values)) if not self.minimum <= v <= self.maximum]
        if bad:
            raise Refused(f"{bad[0]} is out of range: each value must be {self.minimum}-{self.maximum}")
        return tuple(sorted(set(values)))

    def show(self, value: Any) -> str:
        return ",".join(str(v) for v in value)


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


def format_number(value: float) -> str:
    """A number short (``0.25``, ``180``) but exact: reading it back gives ``value``."""
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


class IntChoice(Integer):
    """One of a few integers (``--group-size``)."""

    def __init__(self, *options: int) -> None:
        super().__init__(min(options))
        self.options = options
        self.allowed = "one of " + ", ".join(map(str, options))

    def __call__(self, raw: object) -> int:
        value = super().__call__(raw)
        if value not in self.options:
            raise ValueError
        return value


class Number(Reader):
    """A finite number, maybe bounded (``[minimum, maximum]``)."""

    def __init__(self, minimum: float | None = None, maximum: float | None = None) -> None:
        self.minimum = minimum
        self.maximum = maximum
        if minimum is not None and maximum is not None:
            self.allowed = f"a number from {minimum:g} to {maximum:g}"
        elif minimum is not None:
            self.allowed = f"a number >= {minimum:g}"
        else:
            self.allowed = "a number"

    def __call__(self, raw: object) -> float:
        if isinstance(raw, bool):
            raise ValueError
        value = float(raw) if isinstance(raw, (str, int, float)) else math.nan
        if not math.isfinite(value):
            raise ValueError
        if (self.minimum is not None and value < self.minimum) or (
            self.maximum is not None and value > self.maximum
        ):
            raise ValueError
        return value

    def show(self, value: Any) -> str:
        return format_number(value)


class DraftValue(Reader):
    """A ``--draft`` value (``shared.draft.spec``), kept in its normal spelling."""

    def __init__(self) -> None:
        from .draft.spec import DRAFT_FORMS

        self.allowed = DRAFT_FORMS

    def __call__(self, raw: object) -> str:
        from .draft.spec import DraftSpec

        if not isinstance(raw, str):
            raise ValueError
        try:
            return str(DraftSpec.parse(raw))
        except UsageError:
            raise ValueError from None


class SplitRange(Reader):
    """Trunk layers ``A:B`` as a pair of ints (the model's range is checked once it is known)."""

    allowed = "A:B, two layer indices such as 2:28"

    def __call__(self, raw: object) -> tuple[int, int]:
        if isinstance(raw, (tuple, list)) and len(raw) == 2 and all(type(x) is int for x in raw):
            return (raw[0], raw[1])
        m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", raw) if isinstance(raw, str) else None
        if not m:
            raise ValueError
        return int(m.group(1)), int(m.group(2))

    def show(self, value: Any) -> str:
        return f"{value[0]}:{value[1]}"


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

    def show(self, value: Any) -> str:
        return "on" if value else "off"


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

    def show(self, value: Any) -> str:
        if isinstance(value, int):
            for unit in ("TiB", "GiB", "MiB", "KiB"):
                if value >= _SIZE_UNITS[unit.lower()] and value % _SIZE_UNITS[unit.lower()] == 0:
                    return f"{value // _SIZE_UNITS[unit.lower()]}{unit}"
        return str(value)


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

    def show(self, value: Any) -> str:
        for unit, size in (("h", 3600), ("m", 60)):
            if value >= size and value % size == 0:
                return f"{value / size:g}{unit}"
        return f"{format_number(value)}s" if value else "0"


class Durations(Reader):
    """Several durations, comma-separated (``0,5,20,50,100ms``): a number without a unit takes
    the unit of the last item that has one (so ``0,5,100ms`` is all milliseconds), else seconds.
    Sorted, duplicates dropped; each from ``minimum`` to ``maximum`` seconds (a bound that catches
    ``50`` meant as milliseconds)."""

    def __init__(self, minimum: float = 0.0, maximum: float = math.inf) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self.allowed = (
            f"comma-separated durations from {minimum:g} to {maximum:g} s such as 0,5,20,50,100ms"
        )

    def __call__(self, raw: object) -> tuple[float, ...]:
        items = raw.split(",") if isinstance(raw, str) else raw
        if not isinstance(items, (list, tuple)) or not items:
            raise ValueError
        parsed: list[tuple[float, str]] = []
        for item in items:
            if isinstance(item, bool):
                raise ValueError
            if isinstance(item, (int, float)):
                parsed.append((float(item), "s"))
                continue
            m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", str(item).lower())
            if not m or m.group(2) not in _DURATION_UNITS:
                raise ValueError
            parsed.append((float(m.group(1)), m.group(2)))
        units = [u for _, u in parsed if u]
        fallback = units[-1] if units else "s"
        out = sorted({n * _DURATION_UNITS[u or fallback] for n, u in parsed})
        if any(not (math.isfinite(v) and self.minimum <= v <= self.maximum) for v in out):
            raise ValueError
        return tuple(out)

    def show(self, value: Any) -> str:
        return ",".join(f"{format_number(v * 1e3)}ms" for v in value)


class ByteRate(ByteSize):
    """Bytes per second: a size with an optional ``/s`` (``1MiB/s``, ``125000``)."""

    def __init__(self, minimum: int = 1) -> None:
        super().__init__(minimum)
        self.allowed = f"bytes per second >= {minimum} such as 125000, 1MB/s or 10MiB/s"

    def __call__(self, raw: object) -> int | str:
        if isinstance(raw, str) and raw.strip().lower().endswith("/s"):
            raw = raw.strip()[:-2]
        return super().__call__(raw)

    def show(self, value: Any) -> str:
        return f"{super().show(value)}/s"


class DraftValues(Reader):
    """Several ``--draft`` values, comma-separated (``off,ngram,student:PATH``), each in its
    normal spelling, in the order given, duplicates dropped."""

    def __init__(self) -> None:
        from .draft.spec import DRAFT_FORMS

        self.allowed = "comma-separated drafts, each " + DRAFT_FORMS

    def __call__(self, raw: object) -> tuple[str, ...]:
        items = raw.split(",") if isinstance(raw, str) else raw
        if not isinstance(items, (list, tuple)) or not items:
            raise ValueError
        one = DraftValue()
        out: list[str] = []
        for item in items:
            value = one(item)
            if value not in out:
                out.append(value)
        return tuple(out)

    def show(self, value: Any) -> str:
        return ",".join(value)


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

    def show(self, value: Any) -> str:
        return ",".join(value)


class Targets(Addresses):
    """The trunk daemons (``--trunk``): gRPC targets, one per repeated flag or TOML list item,
    or comma-separated in one string (``SPLITLM_TRUNK=unix:/a.sock,unix:/b.sock``).

    A target may be any gRPC name (``unix:``, ``host:port``, ``dns:///name``...); a string that
    starts with ``ipv4:`` or ``ipv6:`` is one target, commas and all (gRPC's own list of
    addresses, one replica set), so it is never split; nor is ``unix:/a.sock,/b.sock`` (a path
    after a comma continues a ``unix:`` list).
    """

    allowed = (
        "daemon addresses like unix:/path/trunk.sock or host:port (repeat --trunk, a TOML list, "
        "or comma-separated)"
    )

    def __call__(self, raw: object) -> tuple[str, ...]:
        items = [raw] if isinstance(raw, str) else raw
        if not isinstance(items, (list, tuple)) or not items:
            raise ValueError
        out: list[str] = []
        for item in items:
            if not isinstance(item, str):
                raise ValueError
            text = item.strip()
            pieces = [text] if text.startswith(("ipv4:", "ipv6:")) else [p.strip() for p in text.split(",")]
            if not all(pieces):
                raise ValueError
            for piece in pieces:
                if piece.startswith("/") and out and out[-1].startswith("unix:"):
                    out[-1] += "," + piece  # unix:/a.sock,/b.sock: one replica set (shared.replicas)
                else:
                    out.append(piece)
        return tuple(out)

    def show(self, value: Any) -> str:
        """One target as given, or a list comma-separated (as ``SPLITLM_TRUNK`` takes it)."""
        return value if isinstance(value, str) else ",".join(value)


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
    commands: tuple[str, ...] | None = None,
    metavar: str | None = None,
    repeat: bool = False,
    flag: str = "",
) -> Any:
    """Declare one key of a settings dataclass: its one definition, for every layer.

    Args:
        default: the value nobody set; None means "unset" (the program decides).
        read: reads a raw value from a flag, the environment or the file; a ``Choice`` also
            gives the flag its choices, a ``Boolean`` makes it a switch.
        help: one line, for ``--help`` and ``--print-config``.
        env: the environment variable when it is not ``SPLITLM_<KEY>``.
        default_factory: computes the default (e.g. from the runtime dir) instead of ``default``.
        commands: the commands whose parsers get the flag (None: the class's ``COMMANDS``).
        metavar: the flag's value in ``--help`` (None: ``KEY``, or the choices).
        repeat: the flag may be given several times (a list, e.g. ``--listen``).
        flag: the option string when it is not ``--key`` (``serve_listen`` is ``serve``'s
            ``--listen``: its own key keeps it apart from the daemon's ``SPLITLM_LISTEN``).
    """
    meta = {
        "read": read, "help": help, "env": env, "commands": commands, "metavar": metavar,
        "repeat": repeat, "flag": flag,
    }
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def _default_listen() -> tuple[str, ...]:
    from .paths import default_address

    return (default_address(),)


def _default_trunk() -> tuple[str, ...]:
    from .paths import default_address

    return (default_address(),)


# ---- the commands: `trunkd` is splitlm-trunkd; `splitlm` the client's top-level parser (before
# the subcommand); the rest are the client's subcommands

TRUNKD = "trunkd"
SPLITLM = "splitlm"
SERVE = "serve"
"""``splitlm serve``: the OpenAI-compatible HTTP gateway (``tui/serve``); its sampling flags are
the defaults of requests that leave a field out."""
CLIENT_COMMANDS = ("generate", "compare", "chat", "bench", "info", "monitor", "distill", SERVE)
LOCAL_PARTS = ("generate", "compare", "chat", "bench", SERVE)
"""The commands that run parts of the model here."""
SESSIONS = ("generate", "compare", "chat", SERVE)
"""The commands that hold split sessions: failover and sampling apply."""
DISTILL = "distill"
"""``splitlm distill``: trains a draft here from the model's own weights (``tui/distill``)."""
RELAY = "relay"
"""``splitlm relay``: the bench's slow link, standalone (no session, no model)."""
COMMANDS: tuple[str, ...] = (TRUNKD, SPLITLM, *CLIENT_COMMANDS, RELAY)
PLAN = "plan"
"""``splitlm plan``: where to cut a model into stages, from its config alone (``shared.partition``);
no daemon, no weights."""
COMMANDS = (*COMMANDS, PLAN)

# ---- the precision names, spelled here and nowhere else

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
"""``--dtype`` besides ``auto``."""
WEIGHT_PRECISIONS = ("float32", "bfloat16", "int8", "int4", "gguf")
"""``--weights`` besides ``auto`` (``shared.models.precision``)."""
GROUP_SIZES = (32, 64, 128, 256)
"""``--group-size``: weights per scale of int8/int4 (multiples of the kernels' 32-weight block)."""
NARROW_WIRE_DTYPES = ("bfloat16", "float16")
PARTITION_STRATEGIES = ("uniform", "memory", "compute", "mixed", "custom")
"""``--strategy`` (``shared.partition``): how a plan cuts the trunk into stages or over devices."""
_STRATEGY_HELP = (
    "how the trunk is cut into stages or over --devices: uniform (as many layers each), memory "
    "(weights + KV cache at --max-context), compute (FLOPs per token), mixed (half of each share), "
    "custom (--layers)"
)
_DEVICES_HELP = "devices the trunk is cut over, one contiguous range of layers each, e.g. cuda:0,cuda:1 or cpu,cpu"
_LAYERS_HELP = "with --strategy custom: the trunk stages, A:B separated by commas, e.g. 2:15,15:28"
_CLIENT_MEMORY_HELP = (
    "bound the client's bottom + top (embedding, head, their layers, KV at --max-context) to this "
    "size; unset: the family's default split"
)
"""``--wire-dtype`` besides ``exact``: half the bytes of float32."""

_LOG_LEVELS = Choice("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", fold_case=True)
_DTYPES = Choice("auto", *COMPUTE_DTYPES)
_WEIGHTS = Choice("auto", *WEIGHT_PRECISIONS)
_WIRE_DTYPES = Choice("exact", *NARROW_WIRE_DTYPES)
_INT8 = (
    "int8/int4: weights quantised per group, float32 activations, CPU only; gguf: a GGUF file's "
    "own quantisation"
)
_GROUP_SIZE = "weights per scale of --weights int8/int4"
_LOG_HELP = "logging level: " + ", ".join(_LOG_LEVELS.options)


@dataclass(frozen=True)
class DaemonSettings:
    """What ``splitlm-trunkd`` runs with; see the README's "Daemon options" for each key."""

    COMMANDS: ClassVar[tuple[str, ...]] = (TRUNKD,)

    model: str = setting("smollm2", Text(), "smollm2, a .gguf file, a model directory or a hub id")
    # checked against the model's layer count once it is known (the message names the valid range)
    split: str | None = setting(
        None, Text(), "trunk layers A:B, 0 < A < B < L (unset: the family's default)", metavar="A:B"
    )
    listen: tuple[str, ...] = setting(
        None, Addresses(), "where to listen: unix:/path or host:port; repeatable",
        default_factory=_default_listen, metavar="ADDR", repeat=True,
    )
    dtype: str = setting("auto", _DTYPES, "compute dtype (auto: float32 on CPU, bfloat16 on GPU)")
    weights: str = setting(
        "auto", _WEIGHTS, f"weight precision of the trunk ({_INT8}; auto: as --dtype)"
    )
    group_size: int = setting(32, IntChoice(*GROUP_SIZES), _GROUP_SIZE, metavar="N")
    device: str = setting("auto", Text(), "auto, cpu, cuda or cuda:N")
    threads: int | None = setting(
        None, Integer(1), "torch intra-op threads (unset: torch's choice)", metavar="N"
    )
    max_sessions: int = setting(64, Integer(1), "sessions open at once", metavar="N")
    max_context: int | None = setting(
        None, Integer(1), "positions per session (unset: the model's)", metavar="N"
    )
    max_cache_bytes: int | str = setting(
        "auto",
        ByteSize(1, auto=True),
        "trunk KV cache of all sessions together, e.g. 8GiB "
        "(auto: 90% of free GPU memory after loading, half the free RAM on CPU)",
        metavar="SIZE",
    )
    max_message_bytes: int = setting(
        256 * 2**20, ByteSize(1), "gRPC message size limit, both directions", metavar="SIZE"
    )
    idle_timeout: float = setting(
        1800.0, Duration(0, "never"), "close a session idle this long (0: never)", metavar="DURATION"
    )
    shutdown_grace: float = setting(
        10.0, Duration(0), "on SIGTERM, how long in-flight steps may finish", metavar="DURATION"
    )
    keepalive: float = setting(
        30.0, Duration(1), "ping idle connections this often; dead peers are dropped",
        metavar="DURATION",
    )
    batch: bool = setting(
        False, Boolean(),
        "run concurrent sessions' decode steps as one batch: more tokens/s in all, outputs equal "
        "to solo runs to float rounding, not bit for bit",
    )
    batch_window: float = setting(
        0.0, Duration(0), "with batch: wait this long for more steps before a batch (0: none)",
        metavar="DURATION",
    )
    # daemon.schedule.DEFAULT_PREFILL_SLICE (shared never imports daemon): chosen by measurement
    prefill_slice: int = setting(
        1024, Integer(0),
        "cut a step of more positions x trunk layers than this (a long prefill) between layers "
        "whenever another session's step waits, so decode steps run in between; bit-identical "
        "(0: never cut)",
        metavar="N",
    )
    tls_cert: Path | None = setting(
        None, PathValue(), "PEM certificate: serve TCP addresses over TLS", metavar="PEM"
    )
    tls_key: Path | None = setting(
        None, PathValue(), "PEM private key of --tls-cert", metavar="PEM"
    )
    token_file: Path | None = setting(
        None, PathValue(), "file holding the bearer token clients must send (all RPCs but health)",
        metavar="PATH",
    )
    insecure: bool = setting(
        False, Boolean(),
        "allow a non-loopback TCP address without TLS and a token (logged as a warning)",
    )
    metrics: str | None = setting(
        None, HostPort(),
        "serve Prometheus metrics at http://HOST:PORT/metrics, plain HTTP (unset: off)",
        metavar="HOST:PORT",
    )
    log_level: str = setting("INFO", _LOG_LEVELS, _LOG_HELP, metavar="LEVEL")
    # ---- plans (shared.partition): --split auto and --devices
    strategy: str = setting("memory", Choice(*PARTITION_STRATEGIES), _STRATEGY_HELP)
    stages: int | None = setting(
        None, Integer(1), "with --split auto: the trunk is this many stages (daemons); this one serves --stage",
        metavar="N",
    )
    stage: int | None = setting(
        None, Integer(1), "with --split auto --stages N: which stage this daemon serves, 1 to N", metavar="I"
    )
    devices: str | None = setting(None, Text(), _DEVICES_HELP + " (unset: --device alone)", metavar="DEV,DEV,...")
    layers: str | None = setting(None, Text(), _LAYERS_HELP + " (with --devices: one range per device)",
                                 metavar="A:B,...")
    client_memory: int | None = setting(None, ByteSize(1), "with --split auto: " + _CLIENT_MEMORY_HELP, metavar="SIZE")

    # containers and Kubernetes (deploy/): kubelet's grpc probes speak neither TLS nor tokens
    health_listen: tuple[str, ...] | None = setting(
        None, Addresses(),
        "also serve grpc.health.v1 alone here, plaintext and without a token, for probes that "
        "cannot do TLS (Kubernetes' grpc: probes); no trunk RPC is answered there; repeatable "
        "(unset: health only on --listen)",
        metavar="ADDR", repeat=True,
    )


@dataclass(frozen=True)
class ClientSettings:
    """What ``splitlm`` (CLI and TUI) connects with."""

    COMMANDS: ClassVar[tuple[str, ...]] = SESSIONS
    """The commands of a key that names none: those that hold split sessions."""

    trunk: tuple[str, ...] = setting(
        None, Targets(),
        "the daemon: unix:/path or host:port; repeatable: daemons serving consecutive layer "
        "ranges are a chain (the route is built from their plans)",
        default_factory=_default_trunk, commands=(*CLIENT_COMMANDS, RELAY), metavar="ADDR", repeat=True,
    )
    model: str | None = setting(
        None, Text(),
        "the local model: smollm2, a .gguf file, a directory or a hub id (unset: the daemon's "
        "when it resolves here, else smollm2)",
        commands=(*LOCAL_PARTS, DISTILL),
    )
    token_file: Path | None = setting(
        None, PathValue(), "file holding the daemon's bearer token", commands=CLIENT_COMMANDS,
        metavar="PATH",
    )
    tls_ca: Path | None = setting(
        None, PathValue(), "PEM CA (or self-signed) certificate: connect over TLS",
        commands=CLIENT_COMMANDS, metavar="PEM",
    )
    dtype: str = setting(
        "auto", _DTYPES, "compute dtype of the local parts (auto: float32 on CPU, bfloat16 on GPU)",
        commands=LOCAL_PARTS,
    )
    weights: str = setting(
        "auto", _WEIGHTS,
        f"weight precision of the parts here ({_INT8}); the trunk keeps the daemon's (auto: the "
        "daemon's; with --full: as --dtype)",
        commands=LOCAL_PARTS,
    )
    group_size: int = setting(32, IntChoice(*GROUP_SIZES), _GROUP_SIZE, commands=LOCAL_PARTS, metavar="N")
    trunk_weights: str = setting(
        "auto", _WEIGHTS,
        "the trunk layers' precision: with a daemon, what it must run (refused before loading "
        "otherwise; auto: whatever it runs); with --full, the trunk layers' own (auto: as --weights)",
        commands=LOCAL_PARTS,
    )
    wire_dtype: str = setting(
        "exact", _WIRE_DTYPES,
        "hidden states on the wire (exact: the trunk's dtype; bfloat16, float16: half the bytes "
        "of float32)",
        commands=LOCAL_PARTS,
    )
    device: str = setting("auto", Text(), "auto, cpu, cuda or cuda:N", commands=(*SESSIONS, DISTILL))
    threads: int | None = setting(
        None, Integer(1), "torch intra-op threads of the local parts (unset: torch's choice)",
        commands=(*LOCAL_PARTS, DISTILL), metavar="N",
    )
    log_level: str = setting(
        "WARNING", _LOG_LEVELS, _LOG_HELP, commands=(SPLITLM,), metavar="LEVEL"
    )
    draft: str = setting(
        "off", DraftValue(),
        "speculative decoding: draft tokens here, verify several per round trip (off, ngram: "
        "prompt lookup, model:PATH: a small model with the same tokenizer, student:PATH: made "
        "by splitlm distill)",
        commands=LOCAL_PARTS, metavar="DRAFT",
    )
    draft_max: int = setting(
        8, Integer(1), "the most tokens one draft proposes (the length adapts below it)",
        commands=LOCAL_PARTS, metavar="K",
    )
    draft_link: float | None = setting(
        None, Number(0.0),
        "weigh a round trip as this many decode steps of compute when deciding how long to draft "
        "(unset: what the session measures; a fixed value makes --full and the split draft alike)",
        commands=("generate", "compare"), metavar="X",
    )
    retry_deadline: float = setting(
        180.0, Duration(0, "turns failover off"),
        "when the daemon goes away mid-session, keep reconnecting this long, then rebuild its "
        "cache and continue (0: fail at once)",
        metavar="DURATION",
    )
    retry_initial: float = setting(
        0.25, Duration(0.01), "first wait before reconnecting; doubles per attempt",
        metavar="DURATION",
    )
    retry_max_delay: float = setting(
        2.0, Duration(0.01), "longest wait between two attempts", metavar="DURATION"
    )
    step_deadline: float = setting(
        60.0, Duration(0.1),
        "a step's reply must come within this, plus an allowance per position that grows with "
        "the step latency seen; then reconnect (or fail)",
        metavar="DURATION",
    )
    # ---- splitlm serve (tui/serve): the OpenAI-compatible gateway
    serve_listen: str = setting(
        "127.0.0.1:8000", HostPort(),
        "where the HTTP endpoint listens; any address but loopback needs --api-key-file",
        commands=(SERVE,), metavar="HOST:PORT", flag="--listen",
    )
    api_key_file: Path | None = setting(
        None, PathValue(),
        "file holding the API key clients must send (Authorization: Bearer KEY); required to "
        "listen beyond loopback",
        commands=(SERVE,), metavar="PATH",
    )
    serve_max_sessions: int = setting(
        16, Integer(1),
        "trunk sessions the gateway holds at once, replying or kept for a conversation's next "
        "turn; one request uses one (more wait for a free one)",
        commands=(SERVE,), metavar="N", flag="--max-sessions",
    )
    keep_bytes: int = setting(
        2**30, ByteSize(0),
        "cache bytes (trunk and client, estimated from the model's shape) the conversations kept "
        "between requests may hold; least recently used go first (0: keep none)",
        commands=(SERVE,), metavar="SIZE",
    )


# ---- the registry


@dataclass(frozen=True)
class Option:
    """One option, as the registry declares it.

    Attributes:
        key: the argparse ``dest``, the settings field and the TOML key.
        read: reads a raw value (its ``allowed`` is the error text; a ``Choice`` gives choices).
        help: one line for ``--help``; the default and the environment variable are appended.
        default: the value nobody set (for layered keys: see ``default_factory``).
        commands: the commands that take it (``TRUNKD``, ``SPLITLM`` or a client subcommand).
        layered: True for a settings field (flag > environment > file > default); False for a
            flag alone, whose parser default is the real default and whose value is read by
            argparse.
        env: the environment variable (None for a flag alone).
        metavar: the value's name in ``--help``.
        flag: the option string, ``--key`` unless it differs.
        repeat: the flag may be repeated (a list).
        default_factory: computes the default (layered keys only).
    """

    key: str
    read: Reader
    help: str
    default: Any = None
    commands: tuple[str, ...] = ()
    layered: bool = False
    env: str | None = None
    metavar: str | None = None
    flag: str = ""
    repeat: bool = False
    default_factory: Callable[[], Any] | None = None

    @property
    def option_string(self) -> str:
        return self.flag or flag_name(self.key)

    @property
    def switch(self) -> bool:
        """A flag without a value: ``--KEY`` (and ``--no-KEY`` for a layered one)."""
        return isinstance(self.read, Boolean)

    def default_value(self) -> Any:
        return self.default_factory() if self.default_factory is not None else self.default

    def argv(self, value: Any) -> list[str]:
        """The flags that give ``value`` (``[]`` for an unset value or a switch that is off)."""
        if value is None or (self.switch and not value and not self.layered):
            return []
        if self.switch:
            return [self.option_string if value else "--no-" + self.option_string[2:]]
        if self.repeat and isinstance(value, (list, tuple)):
            return [part for v in value for part in (self.option_string, self.read.show(v))]
        return [self.option_string, self.read.show(value)]


DISTILL_FLAGS: tuple[Option, ...] = (
    Option("output", PathValue(), "the student's directory (checkpoints, student.json, weights, "
           "loss.png); it must not hold a run unless --resume", commands=(DISTILL,), metavar="DIR"),
    Option("data", PathValue(), "training text: a text file, or JSONL with a text or prompt field per "
           "line (prompts get the teacher's continuations); unset: the shipped prompt set, "
           "continued by the teacher", commands=(DISTILL,), metavar="FILE"),
    Option("layers", Integer(1), "the bridge's own layers, initialised from evenly spaced trunk "
           "layers (--standalone: the whole student's layers)", default=2, commands=(DISTILL,),
           metavar="N"),
    Option("standalone", Boolean(), "make a standalone student (a normal model directory with "
           "fewer layers) instead of a bridge", default=False, commands=(DISTILL,)),
    Option("distill_temperature", Number(0.05, 100), "softens teacher and student distributions "
           "for the KL loss (scaled by T^2)", default=1.0, commands=(DISTILL,), metavar="T",
           flag="--temperature"),
    Option("hard_weight", Number(0), "weight of the hard-label cross-entropy added to the KL loss",
           default=0.0, commands=(DISTILL,), metavar="W"),
    Option("steps", Integer(1), "training steps in all (a resumed run counts on)", default=500,
           commands=(DISTILL,), metavar="N"),
    Option("time_limit", Duration(0, "no limit"), "stop training after this long (then evaluate "
           "and save)", default=0.0, commands=(DISTILL,), metavar="DURATION"),
    Option("batch_size", Integer(1), "sequences per step", default=4, commands=(DISTILL,), metavar="N"),
    Option("seq_len", Integer(8), "tokens per training sequence", default=128, commands=(DISTILL,),
           metavar="N"),
    Option("lr", Number(1e-7, 1.0), "AdamW learning rate", default=3e-4, commands=(DISTILL,),
           metavar="LR"),
    Option("checkpoint_every", Integer(1), "write a checkpoint (and the student) every N steps",
           default=25, commands=(DISTILL,), metavar="N"),
    Option("eval_every", Integer(1), "evaluate on the held-out split every N steps", default=25,
           commands=(DISTILL,), metavar="N"),
    Option("resume", Boolean(), "continue the run in --output from its last checkpoint",
           default=False, commands=(DISTILL,)),
    Option("gen_tokens", Integer(1), "tokens the teacher generates per prompt (prompt data)",
           default=96, commands=(DISTILL,), metavar="N"),
    Option("gen_temperature", Number(0), "temperature of the teacher's continuations (0: greedy)",
           default=0.0, commands=(DISTILL,), metavar="T"),
)
"""``splitlm distill``'s own options (``tui/distill``)."""

CLIENT_FLAGS: tuple[Option, ...] = (
    Option("config", PathValue(),
           "client TOML config file (unset: client.toml in the user config dir, e.g. "
           "~/.config/splitlm/client.toml; it must exist when given)",
           commands=CLIENT_COMMANDS, metavar="PATH"),
    Option("temperature", Number(), "sampling temperature; 0 is greedy", default=0.0,
           commands=SESSIONS, metavar="T"),
    Option("top_k", Integer(0), "keep the k most likely tokens (0: all)", default=0,
           commands=SESSIONS, metavar="K"),
    Option("top_p", Number(), "nucleus sampling mass, in (0, 1] (1: all)", default=1.0,
           commands=SESSIONS, metavar="P"),
    Option("seed", Integer(0),
           "random seed: the sampler's (unset: a fresh one per reply); the bench's and distill's "
           "torch seed (unset: 0)",
           commands=(*SESSIONS, "bench", DISTILL), metavar="N"),
    Option("max_new_tokens", Integer(1), "generate at most this many tokens per reply",
           default=256, commands=SESSIONS, metavar="N"),
    Option("stop", Text(verbatim=True), "stop string; repeatable", commands=("generate", "compare"),
           metavar="S", repeat=True),
    Option("no_chat", Boolean(), "tokenize the raw prompt, no chat template", default=False,
           commands=("generate", "compare")),
    Option("json", Boolean(), "print JSON instead of text (monitor: one object per sample)",
           default=False, commands=("generate", "compare", "info", "monitor", DISTILL)),
    Option("json_path", PathValue(), "write every raw sample and the summary as JSON",
           commands=("bench",), metavar="PATH", flag="--json"),
    Option("split", SplitRange(),
           "trunk layers of the daemon the bench starts, or the plan a distilled bridge replaces, "
           "or with generate --full the layers that run at --trunk-weights (unset: the family's, "
           "the daemon's default); with --trunk it must match the daemon's",
           commands=("generate", "bench", DISTILL), metavar="A:B"),
    Option("batch", Boolean(),
           "start the daemon with --batch (cross-session batching of decode steps)",
           default=False, commands=("bench",)),
    Option("link_rtt", Durations(0, 10),
           "measure across a slow link: a relay between the bench's client and the daemon adds "
           "this round trip (each value a row set: 0,5,20,50,100ms; 0: a direct connection)",
           commands=("bench",), metavar="RTT,..."),
    Option("link_bandwidth", ByteRate(1),
           "with --link-rtt: cap the relay at this many bytes per second each way (unset: no cap)",
           commands=("bench",), metavar="BYTES/S"),
    Option("relay_listen", Text(),
           "where the relay listens: unix:/path or host:port (unset: a new socket in a private "
           "directory when --trunk is a socket, else 127.0.0.1 on a free port)",
           commands=(RELAY,), metavar="ADDR", flag="--listen"),
    Option("rtt", Duration(0), "the round trip the relay adds (each way gets half)", default=0.0,
           commands=(RELAY,), metavar="DURATION"),
    Option("bandwidth", ByteRate(1), "cap each direction at this many bytes per second (unset: no cap)",
           commands=(RELAY,), metavar="BYTES/S"),
    Option("drafts", DraftValues(),
           "the drafts the link rows compare, e.g. off,ngram,student:PATH (unset: off and --draft)",
           commands=("bench",), metavar="DRAFT,..."),
    *DISTILL_FLAGS,
    Option("concurrency", IntList(1, 256),
           "concurrent sessions to measure (default 1,2,4,8,16,32; --quick 1,8)",
           commands=("bench",), metavar="N,N,..."),
    Option("load", IntList(1, 256),
           "load the daemon instead: N sessions stepping at once (each value a row), replaying "
           "hidden states without a model here; aggregate positions/s and step p50/p95, with and "
           "without --batch (one daemon each; --batch: only with; --trunk: that daemon)",
           commands=("bench",), metavar="N,N,..."),
    Option("load_steps", Integer(1), "with --load: recorded decode steps per session",
           default=32, commands=("bench",), metavar="N"),
    Option("load_prompt", Integer(1), "with --load: the prompt each session prefills first (positions)",
           default=16, commands=("bench",), metavar="N"),
    Option("load_prefill", Integer(0),
           "with --load: each row again while one more session prefills this many positions over "
           "and over (0: no such rows)",
           default=0, commands=("bench",), metavar="N"),
    Option("batch_file", PathValue(),
           "run every prompt of a JSONL file (one {\"prompt\": ...} object a line; - reads "
           "standard input) and print one JSON result a line, in input order",
           commands=("generate",), metavar="FILE", flag="--batch"),
    Option("concurrency", Integer(1),
           "with --batch: prompts in flight at once, each in its own trunk session (a daemon "
           "started with --batch batches their steps); --full runs one at a time",
           default=4, commands=("generate",), metavar="N"),
    Option("output", PathValue(),
           "with --batch: write the results to this file (whole, or not at all) instead of "
           "standard output",
           commands=("generate",), metavar="PATH"),
)
"""The client's options that are flags alone (no environment variable, no TOML key) but that
several commands take, or whose flag another program spells too."""

PLAN_FLAGS: tuple[Option, ...] = (
    Option("model", Text(), "smollm2, a .gguf file, or a directory with config.json (no weights needed)",
           commands=(PLAN,)),
    Option("strategy", Choice(*PARTITION_STRATEGIES), _STRATEGY_HELP, default="memory", commands=(PLAN,)),
    Option("stages", Integer(1), "trunk stages (the client's bottom and top come extra; default: one per "
           "--devices entry, else 1)", commands=(PLAN,), metavar="N"),
    Option("devices", Text(), _DEVICES_HELP + "; their free memory is checked", commands=(PLAN,),
           metavar="DEV,DEV,..."),
    Option("client_memory", ByteSize(1), _CLIENT_MEMORY_HELP, commands=(PLAN,), metavar="SIZE"),
    Option("max_context", Integer(1), "positions per session the KV cache must hold (unset: the model's)",
           commands=(PLAN,), metavar="N"),
    Option("weights", _WEIGHTS, "the precision the bytes are counted at (unset: float32)", commands=(PLAN,)),
    Option("group_size", IntChoice(*GROUP_SIZES), _GROUP_SIZE, default=32, commands=(PLAN,), metavar="N"),
    Option("layers", Text(), _LAYERS_HELP, commands=(PLAN,), metavar="A:B,..."),
    Option("json", Boolean(), "print one JSON object (strategy, stages) instead of the table", default=False,
           commands=(PLAN,)),
)
"""``splitlm plan``'s options (``shared.partition``)."""
CLIENT_FLAGS = (*CLIENT_FLAGS, *PLAN_FLAGS)

DAEMON_FLAGS: tuple[Option, ...] = (
    Option("config", PathValue(),
           "TOML config file (unset: trunkd.toml in the user config dir; under systemd "
           "/etc/splitlm/trunkd.toml; it must exist when given)",
           commands=(TRUNKD,), metavar="PATH"),
    Option("health_check", Text(),
           "ask the daemon at ADDR (grpc.health.v1, plaintext: a --health-listen address or a "
           "unix socket) whether it serves, print its answer and exit 0 when SERVING, 1 "
           "otherwise; for container HEALTHCHECKs",
           commands=(TRUNKD,), metavar="ADDR"),
)


def options(cls: type) -> tuple[Option, ...]:
    """The layered options of a settings dataclass, in declaration order."""
    out = []
    for f in dataclasses.fields(cls):
        m = f.metadata
        out.append(Option(
            key=f.name, read=m["read"], help=m["help"],
            default=None if f.default is dataclasses.MISSING else f.default,
            default_factory=None if f.default_factory is dataclasses.MISSING else f.default_factory,
            commands=m.get("commands") or cls.COMMANDS,  # type: ignore[attr-defined]
            layered=True, env=m.get("env") or ENV_PREFIX + f.name.upper(),
            metavar=m.get("metavar"), repeat=bool(m.get("repeat")), flag=m.get("flag") or "",
        ))
    return tuple(out)


def registry() -> tuple[Option, ...]:
    """Every option of both programs."""
    return (*options(DaemonSettings), *DAEMON_FLAGS, *options(ClientSettings), *CLIENT_FLAGS)


def options_for(command: str) -> tuple[Option, ...]:
    """The options ``command`` takes, in the order ``--help`` lists them.

    Raises:
        ValueError: an unknown command.
    """
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}; known: {', '.join(COMMANDS)}")
    return tuple(o for o in registry() if command in o.commands)


def default_of(key: str, command: str = "chat") -> Any:
    """The default of ``command``'s option ``key`` (what the app's own defaults start from)."""
    return next(o for o in options_for(command) if o.key == key).default_value()


class _ArgType:
    """An argparse ``type`` from a reader: a bad value is argparse's error (exit 2, naming the
    flag and what is allowed)."""

    def __init__(self, read: Reader) -> None:
        self.read = read
        self.__name__ = type(read).__name__

    def __call__(self, raw: str) -> Any:
        try:
            return self.read(raw)
        except Refused as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        except (ValueError, TypeError):
            raise argparse.ArgumentTypeError(f"expected {self.read.allowed}, got {raw!r}") from None


def help_text(option: Option) -> str:
    """``option``'s help with its default and environment variable (``%`` escaped for argparse)."""
    notes = []
    default = None if option.switch else option.default_value()
    if default not in (None, "", ()):
        notes.append(f"default: {option.read.show(default)}")
    if option.env:
        notes.append(f"env {option.env}")
    text = option.help + (f" [{'; '.join(notes)}]" if notes else "")
    return text.replace("%", "%%")


SETTINGS_TITLE = "settings (flags > SPLITLM_* environment > config file > defaults)"


def add_flags(parser: argparse.ArgumentParser, command: str) -> None:
    """Add the flags of every registry option ``command`` takes to ``parser``.

    Layered settings go in their own help section, with default None so that ``flags_from``
    tells "given" from "not given"; their raw strings are read by ``load``. Flags alone carry
    their real default and are read by argparse.
    """
    group: Any = None
    for o in options_for(command):
        kwargs: dict[str, Any] = {"dest": o.key, "help": help_text(o)}
        if o.switch and o.layered:  # --no-KEY turns off what the environment or file turned on
            kwargs.update(action=argparse.BooleanOptionalAction, default=None)
        elif o.switch:
            kwargs.update(action="store_true", default=o.default)
        else:
            kwargs.update(
                default=None if o.layered else o.default_value(),
                metavar=o.metavar,
                type=str if o.layered else _ArgType(o.read),
            )
            if o.repeat:
                kwargs["action"] = "append"
            if isinstance(o.read, Choice) and not o.read.fold_case:
                kwargs["choices"] = o.read.options
        if o.layered and group is None:
            group = parser.add_argument_group(SETTINGS_TITLE)
        (group if o.layered else parser).add_argument(o.option_string, **kwargs)


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
    """The environment variable of the setting ``key`` of ``cls``."""
    env = {o.key: o.env for o in options(cls)}[key]
    assert env is not None  # every settings field has one
    return env


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
            data: dict[str, Any] = tomllib.load(fh)  # tomli (Python 3.10) may come without types
            return data
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
    fields = {o.key: o for o in options(cls)}
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
    for key, option in fields.items():
        read = option.read
        ename = option.env or ""
        layers = (
            (flags.get(key), option.option_string),
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
