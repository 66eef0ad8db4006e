"""The unix socket's mode is set by the daemon, whatever the umask it was started with.

In-process, no model: a real ``grpc.aio`` server binds through ``listen_on`` and the file is looked
at right after the bind, before ``start``: grpc listens from the bind on, so the mode seen then is
the one a connecting user meets (the integration test ``test_socket_permissions`` connects as
another user).
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from splitlm.daemon.auth import Security
from splitlm.daemon.server import DIR_MODE, SOCKET_MODE, listen_on
from splitlm.shared.errors import SplitlmError


@pytest.fixture
def umask() -> Iterator[None]:
    """Restores the test process's umask after a test changes it."""
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.parametrize("mask", [0o000, 0o002, 0o022, 0o007, 0o077])
def test_socket_and_made_dirs_take_their_mode_from_birth(tmp_path: Path, umask: None, mask: int) -> None:
    async def main() -> None:
        os.umask(mask)
        server = grpc.aio.server()
        nested = tmp_path / "made" / "here" / "trunk.sock"
        flat = tmp_path / "trunk.sock"
        try:
            socks = listen_on(server, Security(), [f"unix:{nested}", f"unix:{flat}", "127.0.0.1:0"])
            assert socks == [nested, flat]
            for sock in socks:  # listening already (before start): this is what a peer meets
                assert stat.S_ISSOCK(sock.stat().st_mode)
                assert mode(sock) == SOCKET_MODE & ~mask, oct(mode(sock))
            for d in (tmp_path / "made", tmp_path / "made" / "here"):
                assert mode(d) == DIR_MODE & ~mask, (d, oct(mode(d)))
            assert os.umask(mask) == mask  # the process umask is back as it was
        finally:
            await server.stop(None)

    asyncio.run(main())


def test_a_stale_socket_is_replaced_and_an_unmakeable_dir_is_a_clear_error(tmp_path: Path) -> None:
    async def main() -> None:
        server = grpc.aio.server()
        sock = tmp_path / "trunk.sock"
        try:
            listen_on(server, Security(), [f"unix:{sock}"])
        finally:
            await server.stop(None)
        assert sock.is_socket()  # grpc leaves it behind: the next start replaces it
        again = grpc.aio.server()
        try:
            assert listen_on(again, Security(), [f"unix:{sock}"]) == [sock]
        finally:
            await again.stop(None)
        (tmp_path / "file").write_text("")
        with pytest.raises(SplitlmError, match="cannot listen on unix:.*file/x/trunk.sock"):
            listen_on(grpc.aio.server(), Security(), [f"unix:{tmp_path / 'file' / 'x' / 'trunk.sock'}"])

    asyncio.run(main())


def test_the_users_runtime_dir_if_made_is_private(
    tmp_path: Path, umask: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without $XDG_RUNTIME_DIR platformdirs names /tmp/runtime-$UID and leaves it to be made:
    XDG wants it 0700, the daemon's own directory below is 0750 as anywhere."""
    import splitlm.daemon.server as server_mod

    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    monkeypatch.setattr(server_mod, "runtime_dir", lambda: tmp_path / "runtime-0" / "splitlm")
    os.umask(0)
    sock = server_mod.prepare_unix_socket(f"unix:{tmp_path / 'runtime-0' / 'splitlm' / 'trunk.sock'}")
    assert sock is not None
    assert (mode(tmp_path / "runtime-0"), mode(sock.parent)) == (0o700, DIR_MODE)
