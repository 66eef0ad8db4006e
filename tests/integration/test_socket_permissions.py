"""Who may connect to the unix socket of a daemon started by hand (no systemd): a real daemon
process, and a real gRPC client run as another user (``nobody``), with and without membership of
the socket's group.

The daemon runs under umask 000, the worst case: the socket must still be ``0660`` and the
directories it makes ``0750`` (README, "The socket"). Its directories live under a fresh
world-traversable directory in /tmp (pytest's own tmp dir is 0700 and would refuse ``nobody`` for
the wrong reason). Needs root, to start a process as another user.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import trunkd_command

pytestmark = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0,
    reason="needs root: the test runs a client as the user nobody to show it cannot connect",
)

CLIENT = r"""
import errno, socket, sys
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

path = sys.argv[1]
try:
    with grpc.insecure_channel("unix:" + path) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    print("health", health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
except grpc.RpcError as e:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        why = "connect ok"
    except OSError as oe:
        why = errno.errorcode.get(oe.errno, str(oe.errno))
    print("refused", e.code().name, why)
"""
"""A stock gRPC health check from another user; prints ``health SERVING`` or ``refused CODE
ERRNO`` (the errno of a plain ``connect``, to tell a permission refusal from anything else)."""


def nobody() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody on this host")


def as_nobody(*argv: str, groups: list[int] | None = None) -> subprocess.CompletedProcess[str]:
    """``python ARGV`` as nobody with only ``groups`` as supplementary groups (``setpriv``, as
    util-linux has it: Python's own ``subprocess(user=...)`` cannot exec this venv's interpreter
    here, whose symlink points into root's home)."""
    who = nobody()
    if shutil.which("setpriv") is None:
        pytest.skip("no setpriv (util-linux) to run a client as nobody")
    extra = f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"
    return subprocess.run(
        ["setpriv", f"--reuid={who.pw_uid}", f"--regid={who.pw_gid}", extra, sys.executable, *argv],
        cwd="/", env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=60,
    )


def connect_as_nobody(sock: Path, *, groups: list[int] | None = None) -> str:
    """``CLIENT`` against ``sock`` as nobody: ``health SERVING`` or ``refused CODE ERRNO``."""
    r = as_nobody("-c", CLIENT, str(sock), groups=groups)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip()


@pytest.fixture(scope="module")
def nobody_can_run_grpc() -> None:
    """Skip (saying why) where nobody cannot run this interpreter with grpc: then the refusals
    below would prove nothing."""
    r = as_nobody("-c", "import grpc, grpc_health.v1.health_pb2")
    if r.returncode != 0:
        pytest.skip(f"the user nobody cannot run {sys.executable} with grpc: {r.stderr[-500:]}")


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A fresh 0755 directory in /tmp: anyone may traverse it, only root may write."""
    d = Path(tempfile.mkdtemp(prefix="splitlm-perm-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def start_by_hand(model: Path, log: Path, sockets: list[Path], *flags: str,
                  env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """The daemon as a user starts it in a shell, under umask 000; waits for every socket to
    answer a health check (as root)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    e = {k: v for k, v in os.environ.items() if k != "RUNTIME_DIRECTORY"}  # not under systemd
    e.update(env or {})
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            trunkd_command("--model", str(model), "--split", "2:4", "--threads", "1", *flags),
            stdout=fh, stderr=subprocess.STDOUT, env=e, umask=0,
        )
    deadline = time.monotonic() + 180
    try:
        for sock in sockets:
            while True:
                assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
                assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
                try:
                    with grpc.insecure_channel(f"unix:{sock}") as ch:
                        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
                    break
                except grpc.RpcError:
                    time.sleep(0.2)
    except BaseException:
        proc.kill()  # a daemon that never answered where expected must not outlive the test
        proc.wait()
        raise
    return proc


def stop(proc: subprocess.Popen[bytes], log: Path) -> None:
    proc.terminate()
    assert proc.wait(30) == 0, log.read_text(errors="replace")[-3000:]


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_default_socket_by_hand_is_the_users_alone(
    tiny_models: dict[str, Path], world_dir: Path, tmp_path: Path, nobody_can_run_grpc: None
) -> None:
    """No --listen: ``$XDG_RUNTIME_DIR/splitlm/trunk.sock``. The runtime dir is 0700 (XDG asks it,
    platformdirs takes no other), so by hand even the group stays out; below it the daemon makes
    ``splitlm/`` 0750 and the socket 0660, as anywhere."""
    runtime = world_dir / "runtime"
    runtime.mkdir(mode=0o700)
    sock = runtime / "splitlm" / "trunk.sock"
    proc = start_by_hand(tiny_models["llama"], tmp_path / "d.log", [sock],
                         env={"XDG_RUNTIME_DIR": str(runtime)})
    try:
        assert (mode(sock.parent), mode(sock)) == (0o750, 0o660), (oct(mode(sock.parent)), oct(mode(sock)))
        group = [sock.stat().st_gid]
        assert connect_as_nobody(sock) == "refused UNAVAILABLE EACCES"
        assert connect_as_nobody(sock, groups=group) == "refused UNAVAILABLE EACCES"
        runtime.chmod(0o755)  # opened above: splitlm/ (0750) and the socket (0660) let the group in
        assert connect_as_nobody(sock, groups=group) == "health SERVING"
        assert connect_as_nobody(sock) == "refused UNAVAILABLE EACCES"
    finally:
        stop(proc, tmp_path / "d.log")
    assert not sock.exists()


def test_listen_path_by_hand_is_owner_and_group_only(
    tiny_models: dict[str, Path], world_dir: Path, tmp_path: Path, nobody_can_run_grpc: None
) -> None:
    """``--listen unix:PATH``: in a directory anyone may traverse the socket's mode is the only
    guard; missing directories on the way are made 0750."""
    flat = world_dir / "trunk.sock"
    nested = world_dir / "a" / "b" / "trunk.sock"
    proc = start_by_hand(tiny_models["llama"], tmp_path / "d.log", [flat, nested],
                         "--listen", f"unix:{flat}", "--listen", f"unix:{nested}")
    try:
        assert mode(flat) == mode(nested) == 0o660, (oct(mode(flat)), oct(mode(nested)))
        assert mode(world_dir / "a") == mode(world_dir / "a" / "b") == 0o750
        for sock in (flat, nested):
            assert connect_as_nobody(sock) == "refused UNAVAILABLE EACCES", sock
            assert connect_as_nobody(sock, groups=[sock.stat().st_gid]) == "health SERVING", sock
        flat.chmod(0o666)  # the control: with write for others, the same client gets in
        assert connect_as_nobody(flat) == "health SERVING"
    finally:
        stop(proc, tmp_path / "d.log")
