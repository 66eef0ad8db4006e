"""The flags of both programs come from one registry (``splitlm.shared.config``).

- every flag of ``splitlm chat`` survives ``--serve`` (issue 11: the retry and log-level flags
  were dropped): each is given a non-default value, and the command ``--serve`` starts per
  browser tab must parse back to the same settings;
- every option has one definition: each flag of each command maps to exactly one registry entry,
  or is one command's own; and no module but ``shared/config.py`` spells out a precision choice
  list.
"""

from __future__ import annotations

import argparse
import ast
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from splitlm.shared import config
from splitlm.tui import cli
from tests.shared.option_samples import flag_argv, samples

ROOT = Path(__file__).resolve().parents[3]
LAUNCHER_ONLY = {"help", "serve", "host", "port", "paths"}
"""``chat`` flags about the serving process itself, which the app it starts does not take."""


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No user config file, no SPLITLM_* from the developer's shell; torch's threads restored."""
    import os

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    for name in list(os.environ):
        if name.startswith(config.ENV_PREFIX):
            monkeypatch.delenv(name)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _chat_parser() -> argparse.ArgumentParser:
    return _subparsers(cli.build_parser())["chat"]


def _local_sample(action: argparse.Action) -> list[str]:
    """A non-default value for a chat flag the registry does not hold (the app's own)."""
    flag = action.option_strings[-1]
    if action.nargs == 0:
        return [flag]
    if action.type is float:
        return [flag, repr(float(action.default) + 1.5)]
    if action.type is int:
        return [flag, str(int(action.default) + 1)]
    if action.type is Path:
        return [flag, f"/tmp/sample-{action.dest}"]
    if action.type is None:
        return [flag, f"sample {action.dest}"]
    raise AssertionError(f"no sample for chat's {flag}: add one in this test")


def _every_chat_flag(tmp_path: Path) -> list[str]:
    """``splitlm ... chat ...`` with a non-default value for every flag the app takes."""
    registered = {o.key: o for o in config.options_for("chat")}
    cfg = tmp_path / "client.toml"
    cfg.write_text("")
    argv: list[str] = []
    for action in _chat_parser()._actions:
        if action.dest in LAUNCHER_ONLY:
            continue
        if action.dest == "config":
            argv += ["--config", str(cfg)]
        elif action.dest in registered:
            argv += flag_argv(registered[action.dest], samples(registered[action.dest])[0])
        else:
            argv += _local_sample(action)
    top = [w for o in config.options_for(config.SPLITLM) for w in flag_argv(o, samples(o)[0])]
    return [*top, "chat", *argv]


def _parsed(argv: list[str]) -> argparse.Namespace:
    args = cli.build_parser().parse_args(argv)
    cli._apply_config(args)
    return args


def _comparable(args: argparse.Namespace) -> dict[str, Any]:
    out = {k: v for k, v in vars(args).items() if k not in LAUNCHER_ONLY | {"client_config", "version"}}
    loaded = args.client_config
    out["settings"], out["sources"] = loaded.settings, dict(loaded.sources)
    return out


def _child(args: argparse.Namespace) -> list[str]:
    """What ``chat --serve`` runs per browser tab, minus ``python -m splitlm.tui.cli``."""
    from splitlm.tui.app.launch import serve_command

    words = shlex.split(serve_command(args))
    assert words[1:3] == ["-m", "splitlm.tui.cli"]
    return words[3:]


def test_every_chat_flag_survives_serve(tmp_path: Path) -> None:
    argv = _every_chat_flag(tmp_path)
    given = _parsed(argv)
    default = _comparable(_parsed(["chat"]))
    # the test itself: every flag the app takes was moved off its default
    unchanged = [k for k, v in _comparable(given).items() if k != "sources" and default[k] == v
                 and k not in ("settings", "command")]
    assert not unchanged, f"the sample values left these at their defaults: {unchanged}"
    child = _child(given)
    assert _comparable(_parsed(child)) == _comparable(given), (argv, child)


def test_serve_passes_on_only_what_was_given_as_a_flag(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Settings from the environment or the file stay there: the child reads the same ones, and
    says the same source for each (the app shows where its daemon address came from)."""
    monkeypatch.setenv("SPLITLM_TRUNK", "unix:/tmp/from-env.sock")
    monkeypatch.setenv("SPLITLM_RETRY_DEADLINE", "1m")
    args = _parsed(["chat", "--retry-max-delay", "5", "--serve", "--port", "8123"])
    child = _child(args)
    assert child == ["chat", "--retry-max-delay", "5s"]
    again = _parsed(child)
    assert again.client_config.sources == args.client_config.sources
    assert again.client_config.settings == args.client_config.settings


def _all_parsers() -> dict[str, argparse.ArgumentParser]:
    from splitlm.daemon.cli import build_parser as trunkd_parser

    top = cli.build_parser()
    return {config.TRUNKD: trunkd_parser(), config.SPLITLM: top, **_subparsers(top)}


def test_every_flag_has_one_definition() -> None:
    parsers = _all_parsers()
    assert set(parsers) == set(config.COMMANDS)
    own: dict[str, list[str]] = {}  # a command's own flag -> the commands that have it
    registry_flags = {o.option_string for o in config.registry()}
    for command, parser in parsers.items():
        declared = {o.option_string: o for o in config.options_for(command)}
        seen = set()
        for action in parser._actions:
            flags = [f for f in action.option_strings if f not in ("-h", "--help", "--version")]
            matches = [o for o in config.options_for(command) if o.option_string in flags]
            assert len(matches) <= 1, f"{command} {flags}: {len(matches)} registry entries"
            if matches:  # (a layered switch's --no-KEY belongs to its entry)
                assert action.dest == matches[0].key, (command, flags, action.dest)
                seen.add(matches[0].option_string)
            else:
                for flag in flags:
                    own.setdefault(flag, []).append(command)
        assert seen == set(declared), f"{command}: registry flags missing from its parser"
    for flag, commands in own.items():
        assert len(commands) == 1 and flag not in registry_flags, (
            f"{flag} is spelled by {commands} outside the registry: declare it once in shared.config"
        )


def test_registry_entries_are_consistent() -> None:
    """Within one program no two options share a key, a flag or an environment variable."""
    for command in config.COMMANDS:
        opts = config.options_for(command)
        for attr in ("key", "option_string"):
            values = [getattr(o, attr) for o in opts]
            assert len(values) == len(set(values)), (command, attr)
    for cls in (config.DaemonSettings, config.ClientSettings):
        envs = [o.env for o in config.options(cls)]
        assert len(envs) == len(set(envs))
        for o in config.options(cls):
            assert o.commands and set(o.commands) <= set(config.COMMANDS), o.key


def test_help_shows_each_settings_default_and_variable() -> None:
    """``--help`` of every command renders (argparse formats help with %) and names, for each
    setting, its environment variable and its default when it has one."""
    for command, parser in _all_parsers().items():
        text = " ".join(parser.format_help().split())  # unwrapped
        for o in config.options_for(command):
            assert o.option_string in text, (command, o.key)
            if o.env:
                assert f"env {o.env}" in text, (command, o.key)
            default = o.default_value()
            if default not in (None, "", ()) and not o.switch:
                assert f"default: {o.read.show(default)}" in text, (command, o.key)


PRECISION_NAMES = {"float32", "bfloat16", "float16", "int8"}


def _choice_lists(tree: ast.AST) -> Iterator[tuple[int, list[str]]]:
    """Literal lists, tuples and sets naming two or more precisions (a ``choices=`` list too)."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            names = [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
            if len(PRECISION_NAMES.intersection(names)) >= 2:
                yield node.lineno, names


def test_no_module_but_the_registry_spells_a_precision_choice_list() -> None:
    found = []
    for room in ("shared", "daemon", "tui"):
        for path in sorted((ROOT / room).rglob("*.py")):
            if path == ROOT / "shared" / "config.py" or "_pb2" in path.name:
                continue
            for line, names in _choice_lists(ast.parse(path.read_text(), str(path))):
                found.append(f"{path.relative_to(ROOT)}:{line}: {names}")
    assert not found, "choice lists outside shared/config.py:\n" + "\n".join(found)
    # and the registry's own are used by the parsers: the flags offer exactly these
    p = _subparsers(cli.build_parser())["generate"]
    choices = {a.dest: tuple(a.choices) for a in p._actions if a.choices}
    assert choices["weights"] == ("auto", *config.WEIGHT_PRECISIONS)
    assert choices["dtype"] == ("auto", *config.COMPUTE_DTYPES)


def test_flag_values_keep_their_meaning() -> None:
    """What argparse read before the registry, it reads the same: stop strings verbatim
    (whitespace is a real stop), the bench's seed 0 when unset, a bad value named with the flag."""
    from splitlm.tui.bench.options import BenchOptions

    p = cli.build_parser()
    assert p.parse_args(["generate", "--stop", "\n", "--stop", " END", "hi"]).stop == ["\n", " END"]
    assert p.parse_args(["generate", "hi"]).stop is None
    bench = p.parse_args(["bench"])
    assert BenchOptions.from_args(bench, None).seed == 0
    assert p.parse_args(["bench", "--split", "2:5"]).split == (2, 5)
    with pytest.raises(SystemExit):
        p.parse_args(["chat", "--max-new-tokens", "0"])
