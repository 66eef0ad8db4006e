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
