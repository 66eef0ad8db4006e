"""Network namespaces joined by veth pairs, for tests that need real links between daemons.

A test builds its own small network: each ``Netns.namespace()`` is a Linux network namespace with
a veth pair to the host, on its own /24 of ``10.211.0.0/16`` (host end ``10.211.X.1``, namespace
end ``10.211.X.2``); ``Netns.link(a, b)`` joins two namespaces directly on another /24. These are
the tests' own addresses: nothing else on the machine is touched, and everything the harness made
is removed when the ``with`` block ends, however it ends (a failed assertion, a daemon that never
started, Ctrl-C).

Only root may do this: ``require_netns()`` skips a test with the reason when the process is not
root, ``ip`` is missing, or the kernel refuses namespaces (an unprivileged container).

Several test runs may share the machine (other worktrees, ``pytest -n``): subnets are claimed
under a file lock against the addresses already on the host, and every name carries the claimed
subnet number, so two runs never clash.

Who may call: a test's own thread; the objects are not thread-safe.

Example::

    with Netns() as net:
        a = net.namespace()
        d = net.daemon(a, ["--model", str(model), "--threads", "1"], log_path=tmp_path / "a.log")
        d.start()                         # answers from the host at d.address (10.211.X.2:PORT)
        d.proc.send_signal(signal.SIGKILL)
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import pytest

from splitlm.shared.launcher import OwnedDaemon, trunkd_command

PREFIX = "10.211"
"""The tests' own private range: 10.211.X.0/24 per link, X in 1..254."""
LOCK_PATH = Path("/tmp/splitlm-netns.lock")
"""Serialises the claim of a free subnet between concurrent test runs."""
DAEMON_PORT = 50211
"""Every namespace has its own port space: each daemon may listen on the same port."""


def netns_unavailable() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root (the test creates its own namespaces and veth pairs)"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"splitlm-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"the kernel refuses network namespaces: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def require_netns() -> None:
    """Skip the calling test, with the reason, when namespaces cannot be made here."""
    why = netns_unavailable()
    if why is not None:
        pytest.skip(why)


def ip(*args: str, ns: str | None = None) -> str:
    """Run ``ip ARGS`` (inside ``ns`` when given); its stdout.

    Raises:
        RuntimeError: ``ip`` failed; the message has the command and its stderr.
    """
    cmd = ["ip", *args] if ns is None else ["ip", "netns", "exec", ns, "ip", *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()}")
    return done.stdout


@dataclass(frozen=True)
class Namespace:
    """One namespace with a veth pair to the host.

    Attributes:
        name: the namespace (``ip netns exec NAME ...``).
        address: its end of the veth pair, reachable from the host (``10.211.X.2``).
        host_address: the host's end (``10.211.X.1``), reachable from inside.
        host_dev: the host's veth device (``tc`` on it shapes traffic to the namespace).
        dev: the namespace's veth device.
    """

    name: str
    address: str
    host_address: str
    host_dev: str
    dev: str

    def exec_prefix(self) -> list[str]:
        """Prepend to a command to run it inside the namespace."""
        return ["ip", "netns", "exec", self.name]

    def run(self, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside the namespace to completion."""
        return subprocess.run(
            [*self.exec_prefix(), *cmd], capture_output=True, text=True, timeout=timeout
        )

    def popen(self, *cmd: str, **kwargs: object) -> subprocess.Popen[bytes]:
        """Start ``cmd`` inside the namespace (``ip netns exec`` execs it: the pid is the
        command's own, so signals reach it directly)."""
        return subprocess.Popen([*self.exec_prefix(), *cmd], **kwargs)  # type: ignore[call-overload, no-any-return]


class Netns:
    """Namespaces, veth pairs and daemons made for one test; ``with`` removes them all.

    Args:
        tag: part of every name (default: this process's pid), to find leftovers.
    """

    def __init__(self, tag: str | None = None) -> None:
        self.tag = tag or str(os.getpid() % 100_000)
        self.namespaces: list[Namespace] = []
        self._links: list[tuple[str, str | None]] = []  # (device, namespace it lives in or None)
        self._netns_names: list[str] = []
        self._daemons: list[OwnedDaemon] = []
        self._subnets: list[int] = []

    def __enter__(self) -> Netns:
        require_netns()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @contextlib.contextmanager
    def _claim(self) -> Iterator[int]:
        """A /24 no interface on the host uses yet, held under the lock while it is set up."""
        with LOCK_PATH.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                used = {
                    int(word.split(".")[2])
                    for word in ip("-4", "-o", "addr").split()
                    if word.startswith(PREFIX + ".")
                }
                free = next((x for x in range(1, 255) if x not in used and x not in self._subnets), None)
                if free is None:
                    raise RuntimeError(f"no free {PREFIX}.X.0/24 left on this host")
                self._subnets.append(free)
                yield free
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def namespace(self) -> Namespace:
        """A new namespace, its loopback up, with a veth pair to the host, both ends up."""
        with self._claim() as x:
            name = f"splitlm-{self.tag}-{x}"
            host_dev, dev = f"slm{x}h", f"slm{x}n"
            ip("netns", "add", name)
            self._netns_names.append(name)
            ip("link", "add", host_dev, "type", "veth", "peer", "name", dev)
            self._links.append((host_dev, None))  # deleting one end deletes both
            ip("link", "set", dev, "netns", name)
            ip("addr", "add", f"{PREFIX}.{x}.1/24", "dev", host_dev)
            ip("link", "set", host_dev, "up")
            ip("addr", "add", f"{PREFIX}.{x}.2/24", "dev", dev, ns=name)
            ip("link", "set", dev, "up", ns=name)
            ip("link", "set", "lo", "up", ns=name)
        made = Namespace(name, f"{PREFIX}.{x}.2", f"{PREFIX}.{x}.1", host_dev, dev)
        self.namespaces.append(made)
        return made

    def link(self, a: Namespace, b: Namespace) -> tuple[str, str]:
        """Join ``a`` and ``b`` by a veth pair of their own; the addresses ``(a's, b's)`` on it."""
        with self._claim() as x:
            dev_a, dev_b = f"slm{x}a", f"slm{x}b"
            ip("link", "add", dev_a, "type", "veth", "peer", "name", dev_b)
            self._links.append((dev_a, None))
            ip("link", "set", dev_a, "netns", a.name)
            self._links[-1] = (dev_a, a.name)
            ip("link", "set", dev_b, "netns", b.name)
            ip("addr", "add", f"{PREFIX}.{x}.1/24", "dev", dev_a, ns=a.name)
            ip("addr", "add", f"{PREFIX}.{x}.2/24", "dev", dev_b, ns=b.name)
            ip("link", "set", dev_a, "up", ns=a.name)
            ip("link", "set", dev_b, "up", ns=b.name)
        return f"{PREFIX}.{x}.1", f"{PREFIX}.{x}.2"

    def delay(self, ns: Namespace, ms: float) -> None:
        """Delay every packet on the host's end of ``ns``'s veth by ``ms`` (the host-to-namespace
        direction; both ways when called for the namespace side too). Skips without ``tc``."""
        if shutil.which("tc") is None:
            pytest.skip("`tc` (iproute2) is not installed")
        subprocess.run(
            ["tc", "qdisc", "replace", "dev", ns.host_dev, "root", "netem", "delay", f"{ms}ms"],
            check=True, capture_output=True,
        )

    def daemon(
        self,
        ns: Namespace,
        args: Sequence[str],
        *,
        port: int = DAEMON_PORT,
        log_path: Path | None = None,
        name: str | None = None,
    ) -> OwnedDaemon:
        """A ``splitlm-trunkd ARGS`` that runs inside ``ns`` and listens on its veth address;
        not started yet (``start()`` waits until it answers ``Info`` from the host). Stopped at
        ``close`` if the test did not stop it."""
        d = OwnedDaemon(
            args,
            address=f"{ns.address}:{port}",
            log_path=log_path,
            name=name or f"the daemon in {ns.name}",
            program=[*ns.exec_prefix(), *trunkd_command()],
        )
        self._daemons.append(d)
        return d

    def close(self) -> None:
        """Stop the daemons, delete the links and namespaces; never raises (a failing test's
        own error is the one worth seeing), and safe to call twice."""
        for d in self._daemons:
            with contextlib.suppress(Exception):
                d.stop(timeout_s=10)
        self._daemons.clear()
        for dev, ns in reversed(self._links):
            cmd = ["ip", "link", "del", dev] if ns is None else ["ip", "-n", ns, "link", "del", dev]
            subprocess.run(cmd, capture_output=True)
        self._links.clear()
        for name in reversed(self._netns_names):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self._netns_names.clear()
        self.namespaces.clear()
        self._subnets.clear()
