"""Layered settings: flags > SPLITLM_* > TOML file > defaults, with each value's source."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from splitlm.shared import config as _config
from splitlm.shared.config import (
    ClientSettings,
    ConfigError,
    DaemonSettings,
    config_file,
    load,
    read_toml,
    render,
)
from tests.conftest import run_cli
from tests.shared.option_samples import flag_argv, samples

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


@pytest.fixture
def toml(tmp_path: Path):  # type: ignore[no-untyped-def]
    def write(text: str, name: str = "trunkd.toml") -> Path:
        p = tmp_path / name
        p.write_text(text)
        return p

    return write


def test_each_layer_wins_over_the_next(toml) -> None:  # type: ignore[no-untyped-def]
    f = toml(
        'max_sessions = 3\nmax_context = 100\nidle_timeout = "2m"\n'
        'listen = ["127.0.0.1:7000", "unix:/tmp/a.sock"]\n'
    )
    env = {"SPLITLM_MAX_CONTEXT": "200", "SPLITLM_IDLE_TIMEOUT": "90"}
    loaded = load(DaemonSettings, {"idle_timeout": "5s"}, env=env, config=f)
    s = loaded.settings
    assert (s.max_sessions, s.max_context, s.idle_timeout) == (3, 200, 5.0)
    assert s.listen == ("127.0.0.1:7000", "unix:/tmp/a.sock")
    assert loaded.sources["max_sessions"] == str(f)
    assert loaded.sources["max_context"] == "SPLITLM_MAX_CONTEXT"
    assert loaded.sources["idle_timeout"] == "--idle-timeout"
    assert loaded.sources["dtype"] == "default" and s.dtype == "auto"
    assert loaded.file == f


def test_values_are_read_the_same_from_every_layer(toml) -> None:  # type: ignore[no-untyped-def]
    f = toml('max_cache_bytes = "1.5GiB"\ninsecure = true\nshutdown_grace = 2.5\n')
    s = load(DaemonSettings, {}, env={}, config=f).settings
    assert (s.max_cache_bytes, s.insecure, s.shutdown_grace) == (int(1.5 * 2**30), True, 2.5)
    s = load(
        DaemonSettings,
        {},
        env={
            "SPLITLM_MAX_CACHE_BYTES": "512MiB",
            "SPLITLM_INSECURE": "off",
            "SPLITLM_LISTEN": "unix:/a.sock, 127.0.0.1:9",
        },
        config=f,
    ).settings
    assert (s.max_cache_bytes, s.insecure, s.listen) == (
        512 * 2**20,
        False,
        ("unix:/a.sock", "127.0.0.1:9"),
    )
    s = load(
        DaemonSettings, {"max_cache_bytes": "auto", "log_level": "debug"}, env={}, config=f
    ).settings
    assert (s.max_cache_bytes, s.log_level) == ("auto", "DEBUG")


@pytest.mark.parametrize(
    ("flags", "env", "file", "needle"),
    [
        (
            {"max_sessions": "0"},
            {},
            "",
            'max_sessions = "0" from --max-sessions: allowed: an integer >= 1',
        ),
        (
            {},
            {"SPLITLM_MAX_SESSIONS": "many"},
            "",
            'max_sessions = "many" from SPLITLM_MAX_SESSIONS: allowed: an integer',
        ),
        (
            {},
            {},
            "max_sessions = true\n",
            "max_sessions = true from {file}: allowed: an integer >= 1",
        ),
        ({}, {}, 'max_cache_bytes = "lots"\n', "from {file}: allowed: a size in bytes"),
        (
            {},
            {"SPLITLM_IDLE_TIMEOUT": "-3"},
            "",
            'idle_timeout = "-3" from SPLITLM_IDLE_TIMEOUT: allowed: seconds >= 0',
        ),
        (
            {},
            {},
            'dtype = "float64"\n',
            'dtype = "float64" from {file}: allowed: one of auto, float32, bfloat16, float16',
        ),
        (
            {},
            {},
            'listen = ["127.0.0.1"]\n',
            'listen = ["127.0.0.1"] from {file}: allowed: addresses',
        ),
        (
            {},
            {"SPLITLM_SPLIT": " "},
            "",
            'split = " " from SPLITLM_SPLIT: allowed: a non-empty string',
        ),
        ({}, {"SPLITLM_INSECURE": "maybe"}, "", "allowed: true or false"),
    ],
)
def test_a_bad_value_names_key_source_and_what_is_allowed(toml, flags, env, file, needle) -> None:  # type: ignore[no-untyped-def]
    f = toml(file)
    with pytest.raises(ConfigError) as info:
        load(DaemonSettings, flags, env=env, config=f)
    assert needle.format(file=f) in str(info.value)
    assert info.value.exit_code == 2


def test_file_problems_are_reported(toml, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match="unknown key max_sesions; known keys: model, "):
        load(DaemonSettings, {}, env={}, config=toml("max_sesions = 3\n"))
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load(DaemonSettings, {}, env={}, config=toml("max_sessions = \n"))
    with pytest.raises(ConfigError, match=r"nope.toml \(from --config\) does not exist"):
        load(DaemonSettings, {}, env={}, config=tmp_path / "nope.toml")


def test_which_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert config_file("client", None, {})[0] == tmp_path / "xdg" / "splitlm" / "client.toml"
    assert (
        config_file("trunkd", None, {}, system=True)[0]
        == tmp_path / "xdg" / "splitlm" / "trunkd.toml"
    )
    etc = tmp_path / "etc"
    monkeypatch.setattr("splitlm.shared.config.SYSTEM_CONFIG_DIR", etc)
    # INVOCATION_ID alone (a desktop terminal may carry it): /etc/splitlm only if the file exists
    assert (
        config_file("trunkd", None, {"INVOCATION_ID": "abc"}, system=True)[0]
        == tmp_path / "xdg" / "splitlm" / "trunkd.toml"
    )
    etc.mkdir()
    (etc / "trunkd.toml").write_text("")
    assert (
        config_file("trunkd", None, {"INVOCATION_ID": "abc"}, system=True)[0] == etc / "trunkd.toml"
    )
    assert config_file("trunkd", None, {"CONFIGURATION_DIRECTORY": "/etc/splitlm"}, system=True)[
        0
    ] == Path("/etc/splitlm/trunkd.toml")
    assert (
        config_file("client", None, {"INVOCATION_ID": "abc"})[0]
        == tmp_path / "xdg" / "splitlm" / "client.toml"
    )
    assert config_file("trunkd", "x.toml", {"INVOCATION_ID": "abc"}, system=True) == (
        Path("x.toml"),
        True,
        "--config",
    )
    # a default file that does not exist is skipped; values are defaults
    loaded = load(DaemonSettings, {}, env={}, system=True)
    assert loaded.file is None and set(loaded.sources.values()) == {"default"}
    (tmp_path / "xdg" / "splitlm").mkdir(parents=True)
    (tmp_path / "xdg" / "splitlm" / "trunkd.toml").write_text("max_sessions = 5\n")
    assert load(DaemonSettings, {}, env={}, system=True).settings.max_sessions == 5


def test_render_is_a_config_file_that_reads_back_the_same(toml, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    f = toml('max_sessions = 3\nsplit = "2:4"\ntoken_file = "/etc/splitlm/token"\n')
    loaded = load(
        DaemonSettings, {"listen": ["unix:/tmp/x.sock"]}, env={"SPLITLM_KEEPALIVE": "1m"}, config=f
    )
    text = render(loaded, "test")
    assert "max_sessions = 3" in text and f"# {f}" in text and "# SPLITLM_KEEPALIVE" in text
    assert "# max_context =" in text  # unset keys are commented out
    again = tmp_path / "again.toml"
    again.write_text(text)
    assert tomllib.loads(text) == read_toml(again)
    assert load(DaemonSettings, {}, env={}, config=again).settings == loaded.settings


def test_client_settings_defaults_and_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    loaded = load(
        ClientSettings,
        {},
        env={"SPLITLM_TRUNK": "gpu:50051", "SPLITLM_TLS_CA": "~/ca.pem"},
        file_name="client",
    )
    assert loaded.settings.trunk == ("gpu:50051",) and loaded.sources["trunk"] == "SPLITLM_TRUNK"
    assert loaded.settings.tls_ca == Path.home() / "ca.pem"
    assert loaded.settings.log_level == "WARNING"


def test_trunkd_print_config_and_bad_values(tmp_path: Path) -> None:
    f = tmp_path / "trunkd.toml"
    f.write_text('max_sessions = 9\nmodel = "smollm2"\n')
    env = {"PATH": "/usr/bin:/bin", "SPLITLM_MAX_CONTEXT": "512", "XDG_RUNTIME_DIR": str(tmp_path)}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "splitlm.daemon.cli",
            "--config",
            str(f),
            "--print-config",
            "--max-cache-bytes",
            "1GiB",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    lines = {
        line.split("=")[0].strip("# ").strip(): line
        for line in r.stdout.splitlines()
        if "=" in line
    }
    assert lines["max_sessions"].startswith("max_sessions = 9") and lines["max_sessions"].endswith(
        f"# {f} - sessions open at once"
    )
    assert (
        "# SPLITLM_MAX_CONTEXT" in lines["max_context"]
        and "# --max-cache-bytes" in lines["max_cache_bytes"]
    )
    assert "# default" in lines["dtype"]
    assert tomllib.loads(r.stdout)["max_cache_bytes"] == 2**30
    bad = subprocess.run(
        [sys.executable, "-m", "splitlm.daemon.cli", "--config", str(f), "--print-config"],
        capture_output=True,
        text=True,
        env={**env, "SPLITLM_SHUTDOWN_GRACE": "soon"},
        timeout=60,
    )
    assert bad.returncode == 2
    assert 'shutdown_grace = "soon" from SPLITLM_SHUTDOWN_GRACE: allowed: seconds' in bad.stderr
    assert "Traceback" not in bad.stderr


def test_client_reads_client_toml(tmp_path: Path) -> None:
    (tmp_path / "splitlm").mkdir()
    cfg = tmp_path / "splitlm" / "client.toml"
    address = f"unix:{tmp_path / 'nobody.sock'}"
    cfg.write_text(f'trunk = "{address}"\n')
    r = run_cli("info", env={"XDG_CONFIG_HOME": str(tmp_path), "SPLITLM_TRUNK": ""}, timeout=60)
    assert r.returncode == 1 and f"no trunk daemon answers at {address} (from {cfg})" in r.stderr
    r = run_cli(
        "info", env={"XDG_CONFIG_HOME": str(tmp_path), "SPLITLM_LOG_LEVEL": "loud"}, timeout=60
    )
    assert r.returncode == 2 and 'log_level = "loud" from SPLITLM_LOG_LEVEL' in r.stderr
    r = run_cli("info", "--config", str(tmp_path / "missing.toml"), timeout=60)
    assert r.returncode == 2 and "missing.toml (from --config) does not exist" in r.stderr


def test_client_failover_settings_are_layered_too(tmp_path: Path) -> None:
    """The failover's bounds (issue 5: "bounded, configurable") come from flags > SPLITLM_* >
    client.toml > defaults like every client setting, and reach the retry policy."""
    from splitlm.shared.failover import RetryPolicy
    from splitlm.tui import cli

    f = tmp_path / "client.toml"
    f.write_text('retry_deadline = "4m"\nretry_max_delay = 3\n')
    env = {"SPLITLM_RETRY_MAX_DELAY": "5s"}
    loaded = load(ClientSettings, {"retry_initial": "0.5"}, env=env, config=f, file_name="client")
    s = loaded.settings
    assert (s.retry_deadline, s.retry_initial, s.retry_max_delay) == (240.0, 0.5, 5.0)
    assert [loaded.sources[k] for k in ("retry_deadline", "retry_initial", "retry_max_delay")] == [
        str(f), "--retry-initial", "SPLITLM_RETRY_MAX_DELAY"
    ]
    assert load(ClientSettings, {}, env={}, config=f, file_name="client").settings.retry_max_delay == 3
    default = load(ClientSettings, {}, env={}, file_name="client", config=None)
    assert default.settings.retry_deadline >= 120  # a daemon restart that reloads the model fits
    args = cli.build_parser().parse_args(
        ["generate", "--config", str(f), "--retry-deadline", "90", "hi"]
    )
    cli._apply_config(args)
    policy = RetryPolicy.from_settings(args.client_config.settings)
    assert (policy.deadline_s, policy.max_delay_s, policy.initial_delay_s) == (90.0, 3.0, 0.25)
    with pytest.raises(ConfigError, match=r'retry_deadline = "-1" from SPLITLM_RETRY_DEADLINE'):
        load(ClientSettings, {}, env={"SPLITLM_RETRY_DEADLINE": "-1"}, file_name="client")


# ---- the registry: flags > env > TOML > defaults for every setting of both programs, through
# the programs' own parsers (an option added to the registry is covered by adding it)



def _toml_line(option: _config.Option, raw: str) -> str:
    if isinstance(option.read, _config.Boolean):
        return f"{option.key} = {raw}"
    if isinstance(option.read, _config.Integer):
        return f"{option.key} = {int(raw)}"
    if option.repeat:
        return f'{option.key} = ["{raw}"]'
    return f'{option.key} = "{raw}"'


def _effective(option: _config.Option, flag: list[str], cfg: Path, capsys) -> tuple[object, str]:  # type: ignore[no-untyped-def]
    """The value and source ``option`` ends up with when its program starts with ``flag``."""
    if _config.TRUNKD in option.commands:
        from splitlm.daemon.cli import main

        assert main(["--config", str(cfg), "--print-config", *flag]) == 0
        out = capsys.readouterr().out
        line = next(x for x in out.splitlines() if x.lstrip("# ").startswith(f"{option.key} ="))
        value = tomllib.loads(out).get(option.key)  # as --print-config renders it: read it back
        source = line.split("  # ", 1)[1].split(" - ")[0].removesuffix(": unset")
        return (None if value is None else option.read(value)), source
    from splitlm.tui import cli

    if option.commands == (_config.SPLITLM,):  # a flag before the subcommand
        argv = [*flag, "info", "--config", str(cfg)]
    else:
        command = option.commands[0]
        prompt = ["hi"] if command in ("generate", "compare") else []
        argv = [command, "--config", str(cfg), *flag, *prompt]
    args = cli.build_parser().parse_args(argv)
    cli._apply_config(args)
    loaded = args.client_config
    return getattr(loaded.settings, option.key), loaded.sources[option.key]


@pytest.mark.parametrize(
    "option", [o for o in _config.registry() if o.layered], ids=lambda o: f"{o.commands[0]}:{o.key}"
)
def test_every_setting_layers_flag_env_file_default(  # type: ignore[no-untyped-def]
    option, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import os

    import torch

    for name in list(os.environ):
        if name.startswith(_config.ENV_PREFIX):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    threads = torch.get_num_threads()
    flag_raw, env_raw, file_raw = samples(option)
    cfg = tmp_path / "settings.toml"
    read = option.read

    def check(flag: list[str], env: str | None, file: str | None, want_value: object, want_source: str) -> None:
        cfg.write_text(_toml_line(option, file) + "\n" if file is not None else "")
        if env is None:
            monkeypatch.delenv(option.env or "", raising=False)
        else:
            monkeypatch.setenv(option.env or "", env)
        value, source = _effective(option, flag, cfg, capsys)
        assert (value, source) == (want_value, want_source)

    try:
        flag = flag_argv(option, flag_raw)
        check(flag, env_raw, file_raw, read(flag_raw), option.option_string)
        check([], env_raw, file_raw, read(env_raw), option.env)
        check([], None, file_raw, read(file_raw), str(cfg))
        default = option.default_value()
        check([], None, None, default, _config.DEFAULT)
        if option.switch:  # a flag turns off what the environment turned on
            check(["--no-" + option.option_string[2:]], "true", "true", False, option.option_string)
    finally:
        torch.set_num_threads(threads)
