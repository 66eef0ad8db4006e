"""What the app is started with: built once by the CLI, passed down, never read from globals.

No Textual or torch import here: the CLI builds these before deciding to load the app.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...shared.config import default_of
from ...shared.errors import UsageError

if TYPE_CHECKING:
    from ...shared.client import TrunkClient
    from ...shared.draft.spec import DraftSpec
    from ...shared.failover import RetryPolicy
    from ...shared.generation import GenerationSettings

APP_NAME = "splitlm"
DB_NAME = "conversations.sqlite3"
LOG_NAME = "chat.log"


@dataclass(frozen=True)
class ChatSettings:
    """The generation settings the Settings screen edits (the flags give the first values).

    Attributes:
        max_new_tokens: reply length cap, >= 1.
        temperature: 0 is greedy.
        top_k: 0 keeps all tokens.
        top_p: in (0, 1]; 1 keeps all.
        seed: the sampler's seed; None draws a fresh one per reply.
        system_prompt: sent as a ``system`` message first when not empty.
        draft: what drafts tokens for several-per-round-trip steps (``--draft``: off, ngram,
            ngram:N, model:PATH, student:PATH), in its normal spelling; a change applies from the
            next reply.
        draft_max: the most tokens one draft proposes (``--draft-max``, >= 1).
    """

    # the first values are the chat flags' defaults, declared once in the settings registry
    max_new_tokens: int = default_of("max_new_tokens")
    temperature: float = default_of("temperature")
    top_k: int = default_of("top_k")
    top_p: float = default_of("top_p")
    seed: int | None = default_of("seed")
    system_prompt: str = ""
    draft: str = default_of("draft")
    draft_max: int = default_of("draft_max")

    SESSION_KEYS = ("draft", "draft_max")
    """How replies are computed, not what they are (a draft keeps greedy replies exact and
    sampled ones distributed alike): a reopened conversation keeps the current ones."""

    def __post_init__(self) -> None:
        self.generation()  # validates; the errors name the valid ranges
        object.__setattr__(self, "draft", str(self.draft_spec()))  # the normal spelling
        if self.draft_max < 1:
            raise UsageError(f"draft max: must be at least 1, got {self.draft_max}")

    def draft_spec(self) -> DraftSpec:
        """``draft`` parsed (raises ``UsageError`` for a value that names no draft)."""
        from ...shared.draft.spec import DraftSpec

        try:
            return DraftSpec.parse(self.draft)
        except UsageError as e:
            raise UsageError(f"draft: {e}") from None

    def keeping_session_of(self, current: ChatSettings) -> ChatSettings:
        """These settings with ``current``'s draft (``SESSION_KEYS``): a reopened conversation."""
        return replace(self, **{k: getattr(current, k) for k in self.SESSION_KEYS})

    def generation(self) -> GenerationSettings:
        """The shared loop's settings (raises ``UsageError`` for values out of range)."""
        from ...shared.generation import GenerationSettings
        from ...shared.sampling import SamplingSettings

        sampling = SamplingSettings(self.temperature, self.top_k, self.top_p, self.seed)
        return GenerationSettings(max_new_tokens=self.max_new_tokens, sampling=sampling)

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "seed": self.seed,
            "system_prompt": self.system_prompt,
            "draft": self.draft,
            "draft_max": self.draft_max,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], default: ChatSettings | None = None) -> ChatSettings:
        base = default or cls()
        known = {k: v for k, v in d.items() if k in base.to_dict()}
        return replace(base, **known)

    @classmethod
    def parse(cls, fields: dict[str, str]) -> ChatSettings:
        """Settings from form text (the Settings screen).

        Raises:
            UsageError: a field is not a number or is out of range; the message names the field.
        """

        def num(name: str, kind: type) -> Any:
            text = fields.get(name, "").strip()
            try:
                return kind(text)
            except ValueError:
                raise UsageError(f"{name.replace('_', ' ')}: {text!r} is not a {kind.__name__}") from None

        seed_text = fields.get("seed", "").strip()
        return cls(
            max_new_tokens=num("max_new_tokens", int),
            temperature=num("temperature", float),
            top_k=num("top_k", int),
            top_p=num("top_p", float),
            seed=num("seed", int) if seed_text else None,
            system_prompt=fields.get("system_prompt", ""),
            draft=fields.get("draft", "off"),
            draft_max=num("draft_max", int) if "draft_max" in fields else default_of("draft_max"),
        )


@dataclass(frozen=True)
class AppConfig:
    """Everything the app needs to start.

    Attributes:
        trunk: the daemon's address.
        trunk_source: where the address came from ("--trunk", "SPLITLM_TRUNK", ...).
        model: ``--model`` (None: the daemon's model when it resolves here).
        data_dir: where the conversation database lives.
        log_file: where the client logs (the app owns the terminal).
        animations: False over SSH or with ``--no-animation``: no blinking cursor, no animation.
        dtype, device: of the local parts.
        weights: ``--weights`` of the bottom and top (auto: the daemon's precision, or an
            explicit ``dtype``).
        group_size: ``--group-size`` of int8/int4 weights.
        wire_dtype: ``--wire-dtype`` (exact: the trunk's dtype).
        settings: the first generation settings.
        retry: how a broken session reconnects (None: ``RetryPolicy()``, 180 s).
        monitor_interval_s: the server monitor's sampling interval.
        connect: makes a client with the CLI's token and TLS settings (None: a plain client for
            ``trunk``).
        trunks: each ``--trunk`` address when several were given (a route: the server view
            follows each daemon's monitor stream); empty for one, which is ``trunk``.
    """

    trunk: str
    trunk_source: str = "--trunk"
    model: str | None = None
    data_dir: Path = field(default_factory=lambda: default_data_dir())
    log_file: Path = field(default_factory=lambda: default_log_dir() / LOG_NAME)
    animations: bool = True
    dtype: str = default_of("dtype")
    weights: str = default_of("weights")
    group_size: int = default_of("group_size")
    wire_dtype: str = default_of("wire_dtype")
    device: str = default_of("device")
    settings: ChatSettings = field(default_factory=ChatSettings)
    retry: RetryPolicy | None = None
    monitor_interval_s: float = 1.0
    connect: Callable[[], TrunkClient] | None = None
    trunks: tuple[str, ...] = ()

    @property
    def monitor_addresses(self) -> tuple[str, ...]:
        """The daemons the server view follows, one monitor stream each."""
        return self.trunks or (self.trunk,)

    def local_weights(self) -> str | None:
        """The precision asked of the local parts (None: the daemon's); see ``client_weights``."""
        from ...shared.models.precision import client_weights

        return client_weights(self.weights, self.dtype)

    def precisions(self) -> dict[str, Any]:
        """The precision options of ``prepare.split_parts``: the local parts' and the group size."""
        return {"weights": self.local_weights(), "group_size": self.group_size}

    def wire_torch_dtype(self) -> Any:
        """``wire_dtype`` as a torch dtype; None for exact (the trunk's dtype)."""
        if self.wire_dtype in ("", "exact"):
            return None
        from ...shared.codec import NAMES

        return NAMES[self.wire_dtype]

    @property
    def db_path(self) -> Path:
        return self.data_dir / DB_NAME

    def new_client(self) -> TrunkClient:
        """A client of the daemon (each caller gets its own channel)."""
        if self.connect is not None:
            return self.connect()
        from ...shared.client import TrunkClient

        return TrunkClient(self.trunk, source=self.trunk_source)


def default_data_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_data_dir(APP_NAME))


def default_log_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_log_dir(APP_NAME))


def animations_wanted(no_animation_flag: bool, environ: dict[str, str] | None = None) -> bool:
    """Animations (and the blinking cursor) are off with ``--no-animation`` and over SSH, where
    every frame costs bandwidth and latency."""
    env = os.environ if environ is None else environ
    return not (no_animation_flag or env.get("SSH_CONNECTION") or env.get("SSH_TTY"))
