"""Start-up configuration and the ``splitlm chat`` flags answered before Textual loads."""

from __future__ import annotations

import pytest

from splitlm.shared.errors import UsageError
from splitlm.tui.app.config import ChatSettings, animations_wanted
from tests.conftest import run_cli


def test_settings_parse_from_form_text() -> None:
    s = ChatSettings.parse({"max_new_tokens": "12", "temperature": "0.7", "top_k": "40", "top_p": "0.9",
                            "seed": "", "system_prompt": "hi"})
    assert s == ChatSettings(12, 0.7, 40, 0.9, None, "hi")


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [("max_new_tokens", "0", "max-new-tokens"), ("top_p", "1.5", "top-p"), ("temperature", "hot", "temperature"),
     ("top_k", "-1", "top-k")],
)
def test_settings_refuse_bad_values_naming_the_field(field: str, value: str, needle: str) -> None:
    fields = {"max_new_tokens": "8", "temperature": "0", "top_k": "0", "top_p": "1", "seed": ""}
    fields[field] = value
    with pytest.raises(UsageError, match=needle):
        ChatSettings.parse(fields)


def test_animations_off_over_ssh_or_by_flag() -> None:
    assert animations_wanted(False, {})
    assert not animations_wanted(True, {})
    assert not animations_wanted(False, {"SSH_CONNECTION": "10.0.0.1 5 10.0.0.2 22"})


def test_cheap_flags_answer_without_textual(tmp_path) -> None:  # type: ignore[no-untyped-def]
    r = run_cli("chat", "--paths", "--data-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert str(tmp_path / "conversations.sqlite3") in r.stdout and "chat.log" in r.stdout
    code = "import sys, splitlm.tui.cli as c; c.main(['chat', '--paths']); print('textual' in sys.modules, 'torch' in sys.modules)"
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "False False", out.stdout + out.stderr


def test_bad_values_exit_2_before_loading(tmp_path) -> None:  # type: ignore[no-untyped-def]
    r = run_cli("chat", "--max-new-tokens", "0", "--data-dir", str(tmp_path))
    assert r.returncode == 2 and "max-new-tokens" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("chat", "--monitor-interval", "0.01", "--data-dir", str(tmp_path))
    assert r.returncode == 2 and "monitor-interval" in r.stderr


def test_draft_settings_parse_and_refuse_naming_the_field() -> None:
    base = {"max_new_tokens": "8", "temperature": "0", "top_k": "0", "top_p": "1", "seed": ""}
    s = ChatSettings.parse({**base, "draft": "NGRAM:2", "draft_max": "4"})
    assert (s.draft, s.draft_max) == ("ngram:2", 4)  # the normal spelling
    assert ChatSettings.parse(base).draft == "off"
    with pytest.raises(UsageError, match="^draft: .*names no draft"):
        ChatSettings.parse({**base, "draft": "telepathy"})
    with pytest.raises(UsageError, match="^draft max"):
        ChatSettings.parse({**base, "draft": "ngram", "draft_max": "0"})


def test_a_reopened_conversation_keeps_the_current_draft() -> None:
    stored = ChatSettings(max_new_tokens=7, seed=3)  # saved before drafts existed: draft off
    current = ChatSettings(max_new_tokens=99, draft="model:/m", draft_max=3)
    assert stored.keeping_session_of(current) == ChatSettings(max_new_tokens=7, seed=3, draft="model:/m", draft_max=3)


@pytest.mark.parametrize(
    ("draft", "fields"),
    [("off", ("off", "")), ("ngram", ("ngram", "")), ("ngram:2", ("ngram", "2")), ("model:/m x", ("model", "/m x")),
     ("student:s", ("student", "s"))],
)
def test_the_settings_form_shows_a_draft_as_kind_and_path(draft: str, fields: tuple[str, str]) -> None:
    from splitlm.tui.app.screens.settings import draft_fields, draft_value

    assert draft_fields(draft) == fields
    assert ChatSettings(draft=draft_value(*fields)).draft == draft
    assert draft_value("off", "/ignored") == "off"


def test_draft_flags_and_environment_reach_the_app(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``--draft``/``--draft-max`` (and ``SPLITLM_DRAFT``) are the app's first settings."""
    import sys

    from splitlm.tui import cli
    from splitlm.tui.app import launch
    from splitlm.tui.app.app import SplitlmApp

    started: list[ChatSettings] = []
    monkeypatch.setattr(SplitlmApp, "run", lambda self: started.append(self.settings))
    monkeypatch.setattr(launch, "setup_logging", lambda *a: None)
    monkeypatch.setattr(sys, "setswitchinterval", lambda s: None)

    def chat(*argv: str) -> ChatSettings:
        args = cli.build_parser().parse_args(["chat", "--data-dir", str(tmp_path), *argv])
        cli._apply_config(args)
        assert launch._run_chat(args, None, "--trunk") == 0
        return started.pop()

    assert (chat().draft, chat().draft_max) == ("off", 8)
    assert (s := chat("--draft", "ngram:2", "--draft-max", "4")).draft == "ngram:2" and s.draft_max == 4
    monkeypatch.setenv("SPLITLM_DRAFT", "model:/tmp/a-draft")
    assert chat().draft == "model:/tmp/a-draft"
