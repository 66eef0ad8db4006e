"""The client's ``--threads`` knob (env ``SPLITLM_THREADS``): it sets torch's intra-op threads
of the local parts, the flag winning over the environment; unset, torch's own choice stays."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from splitlm.tui import cli


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _apply(monkeypatch: pytest.MonkeyPatch, tmp_path, *argv: str, env: str | None = None) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))  # no user TOML
    if env is None:
        monkeypatch.delenv("SPLITLM_THREADS", raising=False)
    else:
        monkeypatch.setenv("SPLITLM_THREADS", env)
    args = cli.build_parser().parse_args(["generate", *argv, "hi"])
    cli._apply_config(args)


def test_flag_sets_torch_threads(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    torch.set_num_threads(2)
    _apply(monkeypatch, tmp_path, "--threads", "1")
    assert torch.get_num_threads() == 1


def test_env_sets_torch_threads_and_the_flag_wins(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    torch.set_num_threads(2)
    _apply(monkeypatch, tmp_path, env="1")
    assert torch.get_num_threads() == 1
    _apply(monkeypatch, tmp_path, "--threads", "2", env="1")
    assert torch.get_num_threads() == 2


def test_unset_leaves_torch_threads_alone(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    torch.set_num_threads(1)
    _apply(monkeypatch, tmp_path)
    assert torch.get_num_threads() == 1


def test_zero_threads_is_a_usage_error(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from splitlm.shared.errors import SplitlmError

    with pytest.raises(SplitlmError):
        _apply(monkeypatch, tmp_path, "--threads", "0")
