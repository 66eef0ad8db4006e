"""A ``splitlm-trunkd`` this process owns: started as a subprocess (by default on a unix socket in
a private temporary directory), waited for until it serves, stopped with SIGTERM.

One launcher for everything that starts its own daemon: ``splitlm bench``, the measurement
scripts (``scripts/_common.py``) and the tests (``tests/conftest.py``). It lives in ``shared``
because ``tui`` may not import ``daemon``: the daemon runs as ``python -m splitlm.daemon.cli`` in
another process, never imported here.

Who may call: any one thread; ``start`` blocks until the daemon answers ``Info`` (loading the
weights takes seconds to minutes) or is known to have failed.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING

from .errors import DaemonUnreachable, SplitlmError

if TYPE_CHECKING:
    from ..protos import trunk_pb2 as pb
    from .client import TrunkClient

log = logging.getLogger(__name__)

START_TIMEOUT_S = 600.0
"""Loading a large trunk on a busy CPU can take minutes; an exit is seen at once anyway."""
STOP_TIMEOUT_S = 60.0
"""SIGTERM lets in-flight steps finish (the daemon's own grace); after this, SIGKILL."""
POLL_S = 0.1
"""How often ``start`` asks again: a process loading weights offers no event to wait on."""


class DaemonStartError(SplitlmError):
    """The owned daemon exited while starting, or did not answer in time. The message carries
    the tail of its log."""


def trunkd_command(*args: str) -> list[str]:
    """``splitlm-trunkd ARGS`` run by this interpreter (the installed module, no script needed)."""
    return [sys.executable, "-m", "splitlm.daemon.cli", *args]


class OwnedDaemon:
    """A trunk daemon subprocess; ``with OwnedDaemon(...) as d:`` starts and stops it.

    Args:
        args: ``splitlm-trunkd`` arguments besides ``--listen`` (model, split, threads...).
        address: where it listens; None: ``unix:`` a socket in a private directory made here
            (mode 0700) and removed at ``stop``.
        log_path: its stdout and stderr; None: ``trunkd.log`` in the private directory, or
            nowhere when ``address`` is given.
        env: its environment (default: this process's); ``OMP_WAIT_POLICY`` defaults to
            ``PASSIVE`` so its idle OpenMP threads do not spin on the cores the client uses.
        name: how errors call it ("the bench's trunk daemon").
        program: what runs with ``--listen ADDRESS ARGS`` appended (default ``trunkd_command()``;
            a measurement script may run an instrumented server that takes the same flags).
    """

    def __init__(
        self,
        args: Sequence[str],
        address: str | None = None,
        log_path: Path | None = None,
        env: Mapping[str, str] | None = None,
        name: str = "the trunk daemon",
        program: Sequence[str] | None = None,
    ) -> None:
        self.args = list(args)
        self.program = list(program) if program is not None else trunkd_command()
        self.dir: Path | None = None
        if address is None:
            self.dir = Path(tempfile.mkdtemp(prefix="splitlm-trunkd-"))
            address = f"unix:{self.dir / 'trunk.sock'}"
            log_path = log_path or self.dir / "trunkd.log"
        self.address = address
        self.log_path = log_path
        self.env = {**(os.environ if env is None else env)}
        self.env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_code: int | None = None
        self.final_log = ""
        """The log's tail as ``stop`` found it (the private directory is gone after)."""

    @property
    def command(self) -> list[str]:
        return [*self.program, "--listen", self.address, *self.args]

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self.name} was not started")
        return self.proc.pid

    def log_text(self) -> str:
        """Everything it has logged so far ("" without a log file)."""
        if self.log_path is None:
            return ""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 3000) -> str:
        return self.log_text()[-n:]

    def spawn(self) -> subprocess.Popen[bytes]:
        """Start the process and return at once (``wait_ready`` waits)."""
        log.info("starting %s: %s", self.name, " ".join(self.command))
        out: IO[bytes] | int = subprocess.DEVNULL
        if self.log_path is not None:
            out = self.log_path.open("wb")
        try:
            self.proc = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT, env=self.env)
        finally:
            if not isinstance(out, int):
                out.close()  # the child holds its own descriptor
        return self.proc

    def wait_ready(
        self,
        timeout_s: float = START_TIMEOUT_S,
        connect: Callable[[str], TrunkClient] | None = None,
        poll_s: float = POLL_S,
    ) -> pb.InfoReply:
        """Wait until ``Info`` answers; its reply.

        Args:
            connect: the client to ask through (default: a plain ``TrunkClient``); closed here.

        Raises:
            DaemonStartError: it exited first (stopped here otherwise: it did not answer within
                ``timeout_s``).
        """
        from .client import TrunkClient

        if self.proc is None:
            raise RuntimeError(f"{self.name} was not started")
        client = (connect or (lambda a: TrunkClient(a, source=self.name, connect_timeout_s=1.0)))(self.address)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                if self.proc.poll() is not None:
                    raise DaemonStartError(
                        f"{self.name} exited with {self.proc.returncode} while starting:\n{self.log_tail()}"
                    )
                try:
                    return client.info()
                except DaemonUnreachable:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise DaemonStartError(
                            f"{self.name} did not answer within {timeout_s:.0f} s:\n{self.final_log}"
                        ) from None
                    time.sleep(poll_s)
        finally:
            client.close()

    def start(self, timeout_s: float = START_TIMEOUT_S, poll_s: float = POLL_S) -> pb.InfoReply:
        """``spawn`` and ``wait_ready``: the daemon's ``Info`` once it serves.

        Raises:
            DaemonStartError: see ``wait_ready``.
        """
        self.spawn()
        return self.wait_ready(timeout_s, poll_s=poll_s)

    def stop(self, timeout_s: float | None = STOP_TIMEOUT_S) -> int:
        """SIGTERM and wait; its exit code (SIGKILLed after ``timeout_s``: -9; None waits as long
        as it takes). Idempotent; removes the private directory."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %s s of SIGTERM: killing it", self.name, timeout_s)
                self.proc.kill()
                self.proc.wait()
        self.exit_code = int(self.proc.returncode)
        self.final_log = self.final_log or self.log_tail()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
        return self.exit_code

    def __enter__(self) -> OwnedDaemon:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
