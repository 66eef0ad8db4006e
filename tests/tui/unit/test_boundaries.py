"""The rooms' import rule in a live process: opening the chat app's modules loads no daemon module
(the source check of every room's rule is ``tests/test_import_rules.py``)."""

from __future__ import annotations

import subprocess
import sys


def test_the_running_app_loads_no_daemon_module() -> None:
    code = (
        "import sys, splitlm.tui.cli, splitlm.tui.app.app, splitlm.tui.app.comparison\n"
        "bad = sorted(m for m in sys.modules if m.startswith('splitlm.daemon'))\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
