"""Who gets in: exposure rules at start, TLS, and the bearer token, against a real daemon.

A self-signed certificate is made per run (``cryptography``); the daemon binds 0.0.0.0 only with
TLS and a token in place, and every client here reaches it over 127.0.0.1.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitlm.daemon.auth import check_exposure
from splitlm.protos import trunk_pb2 as pb
from splitlm.shared.client import TrunkClient
from splitlm.shared.config import ConfigError, DaemonSettings, load
from splitlm.shared.errors import DaemonUnreachable, TrunkError
from splitlm.shared.plan import Fingerprint
from tests.conftest import free_port, run_cli, run_trunkd, spawn_trunkd

TOKEN = "s3cret-token-for-tests"


@dataclass(frozen=True)
class Pki:
    cert: Path
    key: Path
    token: Path
    cert_pem: bytes


def make_pki(root: Path) -> Pki:
    """A self-signed certificate for 127.0.0.1 and localhost, its key, and a token file."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "splitlm test daemon")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    (root / "cert.pem").write_bytes(cert_pem)
    (root / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (root / "token").write_text(TOKEN + "\n")
    for f in ("key.pem", "token"):
        (root / f).chmod(0o600)
    return Pki(root / "cert.pem", root / "key.pem", root / "token", cert_pem)


def tls_flags(pki: Pki, *, token: bool = True) -> list[str]:
    """The daemon's --tls-cert and --tls-key from ``pki``, and its --token-file unless ``token``
    is off."""
    flags = ["--tls-cert", str(pki.cert), "--tls-key", str(pki.key)]
    return [*flags, "--token-file", str(pki.token)] if token else flags


@dataclass(frozen=True)
class SecureDaemon:
    proc: subprocess.Popen[bytes]
    tcp: str
    unix: str
    log: Path
    pki: Pki

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def _health(address: str, timeout: float = 2.0, **kw: object) -> int:
    with grpc.insecure_channel(address) as ch:
        return int(
            health_pb2_grpc.HealthStub(ch)
            .Check(health_pb2.HealthCheckRequest(), timeout=timeout)
            .status
        )


@pytest.fixture(scope="module")
def secure_daemon(
    tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SecureDaemon]:
    """TLS + token on 0.0.0.0:PORT, and the same daemon on a unix socket (token, no TLS)."""
    root = tmp_path_factory.mktemp("security")
    pki = make_pki(root)
    port = free_port()
    unix = f"unix:{root / 'trunk.sock'}"
    log = root / "trunkd.log"
    with log.open("wb") as fh:
        proc = spawn_trunkd(
            "--model",
            str(tiny_models["llama"]),
            "--split",
            "2:4",
            "--listen",
            f"0.0.0.0:{port}",
            "--listen",
            unix,
            "--threads",
            "1",
            *tls_flags(pki),
            log=fh,
        )
    d = SecureDaemon(proc, f"127.0.0.1:{port}", unix, log, pki)
    deadline = time.monotonic() + 120
    while True:  # health answers without a token: that is how probes see it
        assert proc.poll() is None, d.log_text()[-3000:]
        try:
            if _health(unix) == health_pb2.HealthCheckResponse.SERVING:
                break
        except grpc.RpcError:
            pass
        assert time.monotonic() < deadline, d.log_text()[-3000:]
        time.sleep(0.2)
    yield d
    proc.terminate()
    assert proc.wait(30) == 0, d.log_text()[-3000:]
    assert "Traceback" not in d.log_text()


def _client(
    d: SecureDaemon, *, token: str | None = TOKEN, tls: bool = True, address: str | None = None
) -> TrunkClient:
    return TrunkClient(
        address or d.tcp, token=token, tls_ca=d.pki.cert_pem if tls else None, connect_timeout_s=5.0
    )


def _step_once(client: TrunkClient) -> torch.Tensor:
    p = client.info().plan
    session = client.open_session(
        Fingerprint(p.config_digest, p.weights_digest, p.trunk_start, p.trunk_end), torch.float32
    )
    try:
        out, _ = session.step(torch.randn(1, 3, p.hidden_size), 0)
        return out
    finally:
        session.close()


def test_tls_and_token_let_the_right_client_in(secure_daemon: SecureDaemon) -> None:
    client = _client(secure_daemon)
    try:
        assert client.tls
        assert _step_once(client).shape == (1, 3, 64)
    finally:
        client.close()


@pytest.mark.parametrize("token", [None, "wrong-token", TOKEN + "x", TOKEN[:-1]])
def test_missing_or_wrong_token_is_unauthenticated(
    secure_daemon: SecureDaemon, token: str | None
) -> None:
    client = _client(secure_daemon, token=token)
    try:
        with pytest.raises(TrunkError) as info:
            client.info()
        assert info.value.code == "UNAUTHENTICATED"
        assert ("--token-file" in info.value.details) == (token is None)
        p = pb.Plan()  # a session is refused before the servicer looks at it
        with pytest.raises(TrunkError) as info:
            client.open_session(Fingerprint(p.config_digest, p.weights_digest, 2, 4), torch.float32)
        assert info.value.code == "UNAUTHENTICATED"
    finally:
        client.close()


def test_token_is_required_on_the_unix_socket_too(secure_daemon: SecureDaemon) -> None:
    without = _client(secure_daemon, token=None, address=secure_daemon.unix)
    with_token = _client(secure_daemon, address=secure_daemon.unix)
    try:
        assert not with_token.tls  # no TLS on a unix socket; the token still counts
        with pytest.raises(TrunkError, match="UNAUTHENTICATED"):
            without.info()
        assert _step_once(with_token).shape == (1, 3, 64)
    finally:
        without.close()
        with_token.close()


def test_health_answers_without_a_token_reflection_does_not(secure_daemon: SecureDaemon) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    assert _health(secure_daemon.unix) == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(secure_daemon.unix) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        replies = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        with pytest.raises(grpc.RpcError) as info:
            list(replies)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("where", ["tcp+tls", "unix"])
def test_stock_reflection_client_lists_and_resolves_with_the_token(
    secure_daemon: SecureDaemon, where: str
) -> None:
    """grpc's own reflection client, with the token as stock call credentials (``authorization:
    Bearer``, what ``grpcurl -H`` sends): the services are listed and Trunk's methods resolve to
    their message types."""
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    d = secure_daemon
    transport = (
        grpc.ssl_channel_credentials(d.pki.cert_pem)
        if where == "tcp+tls"
        else grpc.local_channel_credentials(grpc.LocalConnectionType.UDS)
    )
    creds = grpc.composite_channel_credentials(transport, grpc.access_token_call_credentials(TOKEN))
    with grpc.secure_channel(d.tcp if where == "tcp+tls" else d.unix, creds) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        assert sorted(db.get_services()) == [
            "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "splitlm.v1.Trunk",
        ]
        pool = DescriptorPool(db)
        trunk = pool.FindServiceByName("splitlm.v1.Trunk")
        methods = {
            m.name: (m.input_type.full_name, m.output_type.full_name,
                     m.client_streaming, m.server_streaming)
            for m in trunk.methods
        }
        ours = pb.DESCRIPTOR.services_by_name["Trunk"]
        assert methods == {
            m.name: (m.input_type.full_name, m.output_type.full_name,
                     m.client_streaming, m.server_streaming)
            for m in ours.methods
        }
        assert {"Info", "Session", "Monitor"} <= methods.keys()
        # a message type resolves field by field (what a stock client needs to build a request)
        step = pool.FindMessageTypeByName("splitlm.v1.SessionRequest")
        assert [f.name for f in step.fields] == [
            f.name for f in pb.DESCRIPTOR.message_types_by_name["SessionRequest"].fields
        ]
        health = pool.FindServiceByName("grpc.health.v1.Health")
        assert {m.name for m in health.methods} >= {"Check", "Watch"}
        # newer clients (grpcurl) ask for reflection v1 first and fall back to v1alpha only on
        # UNIMPLEMENTED: with the token that is the answer, not UNAUTHENTICATED
        v1 = channel.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo")
        with pytest.raises(grpc.RpcError) as info:
            list(v1(iter([b""]), timeout=5))
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_plain_tcp_to_a_tls_port_fails_cleanly(secure_daemon: SecureDaemon) -> None:
    client = _client(secure_daemon, tls=False)
    t0 = time.monotonic()
    try:
        with pytest.raises(DaemonUnreachable) as info:
            client.info()
    finally:
        client.close()
    assert time.monotonic() - t0 < 10
    assert "--tls-ca" in str(info.value) and secure_daemon.tcp in str(info.value)


def test_cli_takes_token_file_and_tls_ca(secure_daemon: SecureDaemon) -> None:
    d = secure_daemon
    ok = run_cli(
        "info",
        "--trunk",
        d.tcp,
        "--tls-ca",
        str(d.pki.cert),
        "--token-file",
        str(d.pki.token),
        "--json",
    )
    assert ok.returncode == 0, ok.stderr
    assert '"trunk_end": 4' in ok.stdout
    via_env = run_cli(
        "info",
        "--trunk",
        d.tcp,
        "--json",
        env={"SPLITLM_TLS_CA": str(d.pki.cert), "SPLITLM_TOKEN_FILE": str(d.pki.token)},
    )
    assert via_env.returncode == 0, via_env.stderr
    denied = run_cli("info", "--trunk", d.tcp, "--tls-ca", str(d.pki.cert))
    assert (
        denied.returncode == 1
        and "UNAUTHENTICATED" in denied.stderr
        and "--token-file" in denied.stderr
    )
    assert "Traceback" not in denied.stderr


# ---- the exposure rules at start: refused before any weights load


@pytest.mark.parametrize(
    "listen", ["0.0.0.0:{port}", "[::]:{port}", "192.0.2.1:{port}", "example.org:{port}"]
)
def test_non_loopback_without_tls_and_token_is_refused(
    tiny_models: dict[str, Path], listen: str
) -> None:
    r = run_trunkd(
        "--model",
        str(tiny_models["llama"]),
        "--listen",
        listen.format(port=free_port()),
        timeout=60,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert (
        "refusing to listen" in r.stderr and "--tls-cert" in r.stderr and "--insecure" in r.stderr
    )
    assert "Traceback" not in r.stderr + r.stdout


def test_tls_without_token_is_refused_too(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    pki = make_pki(tmp_path)

    def exposed(*flags: str) -> subprocess.CompletedProcess[str]:
        """The daemon on 0.0.0.0 with ``flags``: refused (or not) before any weights load."""
        listen = f"0.0.0.0:{free_port()}"
        return run_trunkd(
            "--model", str(tiny_models["llama"]), "--listen", listen, *flags, timeout=60
        )

    r = exposed(*tls_flags(pki, token=False))
    assert r.returncode == 2 and "a token (--token-file)" in r.stderr and "TLS (" not in r.stderr
    half = run_trunkd("--model", str(tiny_models["llama"]), "--tls-cert", str(pki.cert), timeout=60)
    assert half.returncode == 2 and "needs tls_key" in half.stderr
    missing = exposed(*tls_flags(pki, token=False), "--token-file", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "token_file" in missing.stderr and "nope" in missing.stderr


def _settings(
    *flags: str, env: dict[str, str] | None = None
) -> tuple[DaemonSettings, dict[str, str]]:
    import argparse

    from splitlm.daemon.cli import build_parser
    from splitlm.shared.config import flags_from

    args: argparse.Namespace = build_parser().parse_args(list(flags))
    loaded = load(DaemonSettings, flags_from(args, DaemonSettings), env=env or {}, config=None)
    return loaded.settings, dict(loaded.sources)


def test_exposure_rules(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pki = make_pki(tmp_path)
    for loopback in (
        "127.0.0.1:5000",
        "127.8.9.10:5000",
        "[::1]:5000",
        "localhost:5000",
        "unix:/tmp/x.sock",
    ):
        s, src = _settings("--listen", loopback)
        sec = check_exposure(s, src)
        assert not sec.tls and sec.token is None
    s, src = _settings("--listen", "10.1.2.3:5000")
    with pytest.raises(ConfigError, match="refusing to listen on 10.1.2.3:5000"):
        check_exposure(s, src)
    with caplog.at_level(logging.WARNING, logger="splitlm.daemon.auth"):
        s, src = _settings("--listen", "10.1.2.3:5000", env={"SPLITLM_INSECURE": "yes"})
        assert check_exposure(s, src).insecure
    assert "INSECURE" in caplog.text and "SPLITLM_INSECURE" in caplog.text
    s, src = _settings(
        "--listen",
        "10.1.2.3:5000",
        "--tls-cert",
        str(pki.cert),
        "--tls-key",
        str(pki.key),
        "--token-file",
        str(pki.token),
    )
    sec = check_exposure(s, src)
    assert sec.tls and sec.token == TOKEN and TOKEN not in repr(sec)
    bad_key = replace(s, tls_key=pki.cert)
    with pytest.raises(ConfigError, match="no PEM private key"):
        check_exposure(bad_key, src)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(Exception, match="empty"):
        check_exposure(replace(s, token_file=tmp_path / "empty"), src)


def test_world_readable_token_file_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from splitlm.shared.auth import read_token

    f = tmp_path / "tok"
    f.write_text("abc\n")
    f.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="splitlm.shared.auth"):
        assert read_token(f) == "abc"
    assert "chmod 600" in caplog.text
    if os.geteuid() != 0:  # root reads anything
        f.chmod(0)
        with pytest.raises(Exception, match="cannot read"):
            read_token(f)
