"""``splitlm chat``: its flags, and starting the app (or serving it in a browser).

Imported by the CLI without Textual: cheap flags (``--help``, ``--paths``) and bad values are
answered before Textual, torch or transformers load.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...shared.errors import ExitCode, UsageError
from .config import (
    LOG_NAME,
    AppConfig,
    ChatSettings,
    animations_wanted,
    default_data_dir,
    default_log_dir,
)

SWITCH_INTERVAL_S = 0.0005
"""The GIL hand-over interval of the app's process (Python's default is 5 ms). The reply worker
drops the GIL around every torch op and gRPC call and must win it back from the UI thread each
time; while the UI renders, each hand-back can wait a whole interval. Shorter, the reply keeps its
pace while the screen redraws (scripts/bench_chat.py measures the app against headless)."""


LAUNCHER_FLAGS = ("serve", "host", "port", "paths")
"""The ``dest`` of the flags that are about this process, not the app: ``--serve`` does not hand
them to the app it starts."""


def add_chat_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``splitlm chat``: the registry's (``shared.config``) and the app's own."""
    from ...shared.config import add_flags

    p.add_argument("--system", default="", metavar="TEXT", help="system prompt (default: none)")
    p.add_argument("--no-animation", action="store_true",
                   help="no animations, no blinking cursor (automatic when SSH_CONNECTION is set)")
    p.add_argument("--data-dir", type=Path, default=None, metavar="DIR",
                   help="where conversations are saved (default: the platform's user data dir)")
    p.add_argument("--monitor-interval", type=float, default=1.0, metavar="S",
                   help="seconds between the server monitor's samples, 0.25-10 (default 1)")
    p.add_argument("--paths", action="store_true", help="print where conversations and logs live, and exit")
    p.add_argument("--serve", action="store_true", help="serve the app to a browser with textual-serve")
    p.add_argument("--host", default="localhost", help="--serve: address to listen on (default localhost)")
    p.add_argument("--port", type=int, default=8000, help="--serve: port (default 8000)")
    add_flags(p, "chat")


def setup_logging(log_file: Path, level: str) -> None:
    """Everything logs to ``log_file``: the app owns the terminal, so nothing may print on it."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.FileHandler(log_file, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(True)


def serve_argv(args: argparse.Namespace) -> list[str]:
    """The ``splitlm`` arguments that start, per browser tab, the app this ``chat --serve`` would
    have run: every chat flag the user gave, rebuilt from the parsed values.

    It walks the chat parser itself, so a flag added later is carried too. A layered setting
    (``shared.config``) is passed on only when it came from a flag: the child reads the same
    environment and config file, and reports the same source for each value. The launcher's own
    flags (``LAUNCHER_FLAGS``) stay here.
    """
    from ...shared.config import SPLITLM, format_number, options, options_for

    parser = argparse.ArgumentParser(add_help=False)
    add_chat_arguments(parser)
    loaded = args.client_config
    registered = {o.key: o for o in options_for("chat")}
    layered = {o.key: o for o in options(type(loaded.settings))}

    def given(key: str) -> bool:
        return bool(loaded.sources[key] == layered[key].option_string)

    before = [  # the top-level flags (``splitlm --log-level DEBUG chat``)
        part for o in options_for(SPLITLM) if o.key in layered and given(o.key)
        for part in o.argv(getattr(loaded.settings, o.key))
    ]
    after: list[str] = []
    for action in parser._actions:
        key = action.dest
        if key in LAUNCHER_FLAGS or not action.option_strings:
            continue
        if key in layered:
            if given(key):
                after += layered[key].argv(getattr(loaded.settings, key))
            continue
        value = getattr(args, key)
        if value == action.default:
            continue
        if key == "config":
            value = Path(value).resolve()  # the child may start elsewhere
        if key in registered:
            after += registered[key].argv(value)
        elif action.nargs == 0:
            after.append(action.option_strings[-1])
        else:
            after += [action.option_strings[-1], format_number(value) if isinstance(value, float) else str(value)]
    return [*before, "chat", *after]


def serve_command(args: argparse.Namespace) -> str:
    """The command line textual-serve starts per browser tab (``serve_argv``)."""
    return shlex.join([sys.executable, "-m", "splitlm.tui.cli", *serve_argv(args)])


def hold_typed_keys() -> list[Any] | None:
    """Keep what the user types before the app's first screen for the app.

    Validating the settings imports torch, seconds before Textual takes the terminal. A terminal in
    its usual line mode echoes those keys onto the shell's screen and turns Enter into a newline the
    app reads as ctrl+j, so a prompt typed and sent at once was lost. Without echo, line editing and
    CR-to-NL mapping the keys wait in the terminal's buffer, as they are, for the app to read.

    Returns:
        the terminal's attributes to restore at exit (``restore_terminal``); None when stdin is
        not a terminal.
    """
    if not sys.stdin.isatty():
        return None
    import termios

    fd = sys.stdin.fileno()
    try:
        before = termios.tcgetattr(fd)
        held = termios.tcgetattr(fd)
        held[0] &= ~termios.ICRNL  # iflag: Enter stays a carriage return
        held[3] &= ~(termios.ECHO | termios.ICANON)  # lflag: no echo, no line buffering
        termios.tcsetattr(fd, termios.TCSANOW, held)
    except termios.error:
        return None
    return before


def restore_terminal(before: list[Any] | None) -> None:
    """Put back the attributes ``hold_typed_keys`` found (Textual restores only its own)."""
    if before is None:
        return
    import termios

    try:
        termios.tcsetattr(sys.stdin.fileno(), termios.TCSANOW, before)
    except termios.error:
        pass


def run_chat(args: argparse.Namespace, connect: Callable[[], Any] | None, trunk_source: str) -> int:
    """``splitlm chat``: answer ``--paths``/``--serve``, else run the app until it quits.

    Raises:
        UsageError: a generation setting out of range (before anything loads).
    """
    if args.paths or args.serve:
        return _run_chat(args, connect, trunk_source)
    terminal = hold_typed_keys()
    try:
        code = _run_chat(args, connect, trunk_source)
    finally:
        restore_terminal(terminal)
    if loading_still():
        # quit during the load: it cannot be interrupted, holds only what it reads, and would
        # keep the process (and the user's shell) for the rest of the load, or crash at exit
        logging.getLogger(__name__).info("quit while loading: not waiting for the load")
        logging.shutdown()
        sys.stdout.flush()
        os._exit(int(code))
    return code


def loading_still() -> bool:
    """The chat's load thread (``screens.chat.LOAD_THREAD``) is still running."""
    import threading

    from .screens.chat import LOAD_THREAD  # Textual is loaded by now: the app has run

    return any(t.name == LOAD_THREAD and t.is_alive() for t in threading.enumerate())


def _run_chat(args: argparse.Namespace, connect: Callable[[], Any] | None, trunk_source: str) -> int:
    data_dir = args.data_dir or default_data_dir()
    log_file = default_log_dir() / LOG_NAME
    if not 0.25 <= args.monitor_interval <= 10:
        raise UsageError(f"--monitor-interval must be 0.25-10 seconds, got {args.monitor_interval}")
    if args.paths:
        print(f"conversations  {data_dir / 'conversations.sqlite3'}")
        print(f"log            {log_file}")
        return ExitCode.OK
    settings = ChatSettings(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, seed=args.seed, system_prompt=args.system, draft=args.draft,
        draft_max=args.draft_max,
    )
    from ...shared.failover import RetryPolicy

    retry = RetryPolicy.from_settings(args.client_config.settings)
    if args.serve:
        from textual_serve.server import Server

        command = serve_command(args)
        print(f"serving `splitlm chat` on http://{args.host}:{args.port} (Ctrl+C stops)", flush=True)
        Server(command, host=args.host, port=args.port, title="splitlm chat").serve()
        return ExitCode.OK
    setup_logging(log_file, getattr(args, "log_level", None) or "WARNING")
    config = AppConfig(
        trunk=" -> ".join(args.trunk),  # shown; the client comes from ``connect`` (a route for several)
        trunk_source=trunk_source,
        model=args.model,
        data_dir=data_dir,
        log_file=log_file,
        animations=animations_wanted(args.no_animation),
        dtype=args.dtype or "auto",
        weights=getattr(args, "weights", None) or "auto",
        group_size=getattr(args, "group_size", None) or 32,
        wire_dtype=getattr(args, "wire_dtype", None) or "exact",
        device=args.device or "auto",
        settings=settings,
        retry=retry,
        monitor_interval_s=args.monitor_interval,
        connect=connect,
        trunks=tuple(args.trunk) if len(args.trunk) > 1 else (),
    )
    from .app import SplitlmApp

    sys.setswitchinterval(SWITCH_INTERVAL_S)
    SplitlmApp(config).run()
    return ExitCode.OK
