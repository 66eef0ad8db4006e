"""The daemon a bench run owns: a ``splitlm-trunkd`` subprocess on a temporary unix socket.

Started with the bench's settings, waited for (``Info`` answers), stopped with SIGTERM at the end;
a non-zero exit is an error of the run, since a benchmark against a daemon that crashed on the way
out proves nothing about the figures before.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ...shared.errors import SplitlmError

if TYPE_CHECKING:
    from ...protos import trunk_pb2 as pb
    from ...shared.client import TrunkClient

log = logging.getLogger(__name__)

START_TIMEOUT_S = 600.0
"""Loading a large trunk on a busy CPU can take minutes; a crash is seen at once anyway."""


class OwnedDaemon:
    """A trunk daemon subprocess; ``with`` starts and stops it.

    Args:
        args: ``splitlm-trunkd`` arguments besides ``--listen`` (model, split, dtype, threads...).
    """

    def __init__(self, args: list[str]) -> None:
        self.args = args
        self.dir = Path(tempfile.mkdtemp(prefix="splitlm-bench-"))
        self.address = f"unix:{self.dir / 'trunk.sock'}"
        self.log_path = self.dir / "trunkd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_code: int | None = None
        self.final_log = ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def start(self, client_factory: type[TrunkClient]) -> tuple[TrunkClient, pb.InfoReply]:
        """Start the daemon and wait until ``Info`` answers.

        Raises:
            SplitlmError: it exited (with its log's tail) or did not answer in time.
        """
        from ...shared.errors import DaemonUnreachable

        env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
        cmd = [sys.executable, "-m", "splitlm.daemon.cli", "--listen", self.address, *self.args]
        log.info("starting the trunk daemon: %s", " ".join(cmd))
        with self.log_path.open("wb") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        client = client_factory(self.address, source="the bench's own daemon", connect_timeout_s=1.0)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                client.close()
                raise SplitlmError(
                    f"the bench's trunk daemon exited with {self.proc.returncode} while starting:\n"
                    f"{self.log_tail()}"
                )
            try:
                return client, client.info()
            except DaemonUnreachable:
                if time.monotonic() > deadline:
                    client.close()
                    self.stop()
                    raise SplitlmError(
                        f"the bench's trunk daemon did not answer within {START_TIMEOUT_S:.0f} s"
                    ) from None
                time.sleep(0.1)  # polling a process that is loading weights; no event to wait on

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, wait; returns the exit code (killed after ``timeout_s``: -9)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.exit_code = int(self.proc.returncode)
        self.final_log = self.log_tail()
        shutil.rmtree(self.dir, ignore_errors=True)
        return self.exit_code
