"""Values a test can give any registry option: derived from the option's reader, so an option
added to the registry is covered without touching the tests (a new kind of reader fails loudly
here until it gets samples)."""

from __future__ import annotations

from splitlm.shared import config
from splitlm.shared.config import Option


def samples(option: Option, n: int = 3) -> list[str]:
    """``n`` raw values (as a user types them) that the reader accepts and that differ from the
    option's default; the same value may repeat when the reader allows fewer than ``n``."""
    r = option.read
    default = option.default_value()
    out: list[str]
    if isinstance(r, config.Choice):
        out = [c for c in r.options if c != default]
    elif isinstance(r, config.Boolean):
        out = ["true"]
    elif isinstance(r, config.IntList):
        out = [f"{r.minimum},{r.minimum + 2 + i}" for i in range(n)]
    elif isinstance(r, config.IntChoice):
        out = [str(c) for c in r.options if c != default]
    elif isinstance(r, config.Integer):
        out = [str(r.minimum + 3 + i) for i in range(n)]
    elif isinstance(r, config.Number):
        out = [str(0.375 + i / 8) for i in range(n)]
    elif isinstance(r, config.Durations):
        out = [f"0,{5 + i},50ms" for i in range(n)]
    elif isinstance(r, config.DraftValues):
        out = ["off,ngram", "ngram:2", "off,model:/tmp/sample-draft"]
    elif isinstance(r, config.Duration):
        out = [f"{7 + i}s" for i in range(n)]
    elif isinstance(r, config.ByteSize):
        out = [f"{3 + i}MiB" for i in range(n)]
    elif isinstance(r, config.Addresses):
        out = [f"unix:/tmp/sample-{i}.sock" for i in range(n)]
    elif isinstance(r, config.HostPort):
        out = [f"127.0.0.1:{9001 + i}" for i in range(n)]
    elif isinstance(r, config.SplitRange):
        out = [f"2:{5 + i}" for i in range(n)]
    elif isinstance(r, config.DraftValue):
        out = ["ngram", "ngram:2", "model:/tmp/sample-draft"]
    elif isinstance(r, config.PathValue):
        out = [f"/tmp/sample-{option.key}-{i}" for i in range(n)]
    elif isinstance(r, config.Text):
        out = [f"sample-{option.key}-{i}" for i in range(n)]
    else:
        raise AssertionError(f"no samples for {type(r).__name__} ({option.key}): add them here")
    assert out, option
    return [out[i % len(out)] for i in range(n)]


def flag_argv(option: Option, raw: str) -> list[str]:
    """The command-line words that give ``option`` the raw value ``raw``."""
    if option.switch:
        assert raw == "true", "a switch can only be turned on"
        return [option.option_string]
    return [option.option_string, raw]
