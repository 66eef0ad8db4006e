"""What a container or a pod sees when its start goes wrong, and the health port probes use.

Each refusal is a real ``splitlm-trunkd`` subprocess given what a misconfigured pod gives it: a
model volume that is not mounted (or holds files the daemon's user may not read), a token Secret
that is absent or empty, a ConfigMap whose TOML does not parse. Each must exit at once with a
non-zero code and ONE line on stderr that names the problem (Kubernetes shows it as the
termination message, ``terminationMessagePolicy: FallbackToLogsOnError``), no traceback, and
its health port must never have answered SERVING.

The health-only port (``--health-listen``, what Kubernetes' ``grpc:`` probes use) and the
``--health-check`` probe command are tested on one shared daemon.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from splitlm.daemon.health import check
from splitlm.protos import trunk_pb2 as pb
from splitlm.protos import trunk_pb2_grpc
from tests.conftest import free_port, run_trunkd, spawn_trunkd

TOKEN = "a-token-for-the-health-tests"


def health_check(address: str) -> subprocess.CompletedProcess[str]:
    """``splitlm-trunkd --health-check ADDR``, as a container HEALTHCHECK runs it."""
    return run_trunkd("--health-check", address, timeout=60)


def serving(address: str) -> bool:
    """The probe's own call, in this process (a subprocess per poll would cost a second each)."""
    return check(address, timeout_s=2.0)[0] == 0


def refused(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> tuple[int, str, list[bool]]:
    """Start the daemon with a plaintext health port and ``args``; probe that port until the
    process ends. Returns its exit code, its whole output, and whether each probe saw SERVING."""
    health = f"127.0.0.1:{free_port()}"
    log_path = tmp_path / "trunkd.log"
    full_env = dict(os.environ)
    full_env.update(env or {})
    with log_path.open("wb") as log:
        proc = spawn_trunkd(
            "--listen", f"unix:{tmp_path / 'd.sock'}", "--health-listen", health, "--threads", "1",
            *args, log=log, env=full_env,
        )
        probes = []
        try:
            while proc.poll() is None:
                probes.append(serving(health))
                time.sleep(0.05)
            probes.append(serving(health))  # and once after it ended
            code = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return code, log_path.read_text(), probes


def assert_one_clear_line(code: int, output: str, probes: list[bool], *needles: str) -> None:
    lines = [line for line in output.splitlines() if line.strip()]
    assert code != 0, output
    assert len(lines) == 1, f"expected one line, got:\n{output}"
    assert lines[0].startswith("splitlm-trunkd: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in output
    assert probes and not any(probes), f"health answered SERVING: {probes}"


def test_missing_model_volume(tmp_path: Path) -> None:
    code, out, probes = refused(tmp_path, "--model", "/models/not-mounted")
    assert_one_clear_line(code, out, probes, "/models/not-mounted", "no such file or directory")


def test_model_files_the_daemon_may_not_read(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """A volume whose weights are 0600 for another user: a permission error, not "no such
    file" (what the safetensors reader says) and not a traceback."""
    if os.getuid() == 0:
        pytest.skip("root reads every file; the container test runs this as uid 10001")
    model = shutil.copytree(tiny_models["llama"], tmp_path / "model")
    weights = next(model.glob("*.safetensors"))
    weights.chmod(0)
    code, out, probes = refused(tmp_path, "--model", str(model))
    assert_one_clear_line(code, out, probes, "cannot read", "permission denied")


@pytest.mark.parametrize("token", ["absent", "empty"])
def test_token_secret_absent_or_empty(
    tiny_models: dict[str, Path], tmp_path: Path, token: str
) -> None:
    path = tmp_path / "token"
    if token == "empty":
        path.write_text("\n")
        path.chmod(0o600)
    code, out, probes = refused(
        tmp_path, "--model", str(tiny_models["llama"]), "--token-file", str(path)
    )
    assert_one_clear_line(code, out, probes, "token_file", str(path))
    assert code == 2


def test_config_that_does_not_parse(tmp_path: Path) -> None:
    """The ConfigMap's file, found the way the image finds it (CONFIGURATION_DIRECTORY, as
    systemd's ConfigurationDirectory= sets it)."""
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "trunkd.toml").write_text('model = "/models/model\nlisten = [\n')
    code, out, probes = refused(tmp_path, env={"CONFIGURATION_DIRECTORY": str(etc)})
    assert_one_clear_line(code, out, probes, str(etc / "trunkd.toml"), "not valid TOML")
    assert code == 2


# ---- the health-only port and the probe command, on one daemon


class HealthDaemon:
    def __init__(self, proc: subprocess.Popen[bytes], main: str, health: str, log: Path) -> None:
        self.proc, self.main, self.health, self.log = proc, main, health, log


@pytest.fixture(scope="module")
def health_daemon(
    tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HealthDaemon]:
    tmp = tmp_path_factory.mktemp("health")
    token = tmp / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    main = f"unix:{tmp / 'd.sock'}"
    health = f"127.0.0.1:{free_port()}"
    log = tmp / "trunkd.log"
    with log.open("wb") as fh:
        proc = spawn_trunkd(
            "--model", str(tiny_models["llama"]), "--threads", "1", "--listen", main,
            "--health-listen", health, "--token-file", str(token), log=fh,
        )
    d = HealthDaemon(proc, main, health, log)
    deadline = time.monotonic() + 180
    while not serving(health):
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    yield d
    proc.terminate()
    proc.wait(timeout=60)


def test_health_check_command_reports_serving(health_daemon: HealthDaemon) -> None:
    r = health_check(health_daemon.health)
    assert r.returncode == 0 and r.stdout.strip() == f"{health_daemon.health}: SERVING", r
    # the main address (a unix socket) answers health too, without the token
    assert health_check(health_daemon.main).returncode == 0


def test_health_check_command_fails_where_nothing_listens() -> None:
    r = health_check(f"127.0.0.1:{free_port()}")
    assert r.returncode == 1 and "UNAVAILABLE" in r.stdout, r
    assert "Traceback" not in r.stdout + r.stderr


def test_health_port_answers_no_trunk_rpc(health_daemon: HealthDaemon) -> None:
    """The plaintext port carries nothing but health: a trunk RPC there is UNIMPLEMENTED, even
    with the right token; on the main address the same call needs the token."""
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    with grpc.insecure_channel(health_daemon.health) as ch:
        with pytest.raises(grpc.RpcError) as e:
            trunk_pb2_grpc.TrunkStub(ch).Info(pb.InfoRequest(), timeout=10, metadata=metadata)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with grpc.insecure_channel(health_daemon.main) as ch:
        info = trunk_pb2_grpc.TrunkStub(ch).Info(pb.InfoRequest(), timeout=10, metadata=metadata)
    assert info.plan.trunk_end > info.plan.trunk_start


def test_health_goes_not_serving_then_away_on_sigterm(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """SIGTERM: the daemon exits 0 within its grace, and its health port stops answering
    SERVING (Kubernetes takes the pod out of the Service's DNS answers)."""
    health = f"127.0.0.1:{free_port()}"
    with (tmp_path / "log").open("wb") as fh:
        proc = spawn_trunkd(
            "--model", str(tiny_models["llama"]), "--threads", "1", "--listen",
            f"unix:{tmp_path / 'd.sock'}", "--health-listen", health, "--shutdown-grace", "2s",
            log=fh,
        )
    try:
        while not serving(health):
            assert proc.poll() is None, (tmp_path / "log").read_text()
            time.sleep(0.2)
        proc.terminate()
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not serving(health)
