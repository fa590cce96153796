"""deploy/k8s: every manifest validated against the Kubernetes API schemas (kubernetes-validate, strict: unknown
fields fail), the kustomize build (kubectl's, or kustomize's) when one is installed, and the settings the manifests
rely on."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from stream_app.campaigns import load_campaigns
from stream_app.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
VERSION = "1.30.0"
KUSTOMIZE_VERSION = "v5.5.0"  # the kustomize kubectl 1.32 embeds


def _docs() -> list[dict]:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [d for name in kust["resources"] for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def _worker() -> dict:
    (sts,) = [d for d in _docs() if d["kind"] == "StatefulSet"]
    return sts


def test_every_manifest_passes_strict_schema_validation():
    for doc in _docs():
        kubernetes_validate.validate(doc, VERSION, strict=True)


def test_strict_validation_rejects_an_unknown_field():
    sts = _worker()
    sts["spec"]["template"]["spec"]["containers"][0]["resources"]["requestz"] = {"cpu": "1"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(sts, VERSION, strict=True)


def kustomize_command() -> list[str] | None:
    """A real kustomize: ``$STREAM_APP_KUSTOMIZE`` (.ci/run builds one from the Go module proxy when the machine
    has none), ``kubectl kustomize`` (kubectl embeds kustomize) or a ``kustomize`` on the PATH."""
    if given := os.environ.get("STREAM_APP_KUSTOMIZE"):
        return [given, "build"]
    if kubectl := shutil.which("kubectl"):
        return [kubectl, "kustomize"]
    if kustomize := shutil.which("kustomize"):
        return [kustomize, "build"]
    return None


def test_kustomize_build_validates():
    command = kustomize_command()
    if command is None:  # kubectl is in no Debian repository; the listed manifests are still validated above
        pytest.skip("no kustomize here (kubectl, kustomize or $STREAM_APP_KUSTOMIZE): `go install "
                    f"sigs.k8s.io/kustomize/kustomize/v5@{KUSTOMIZE_VERSION}` gives one (.ci/run does)")  # fmt: skip
    out = subprocess.run([*command, str(K8S)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    built = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert {d["kind"] for d in built} >= {"StatefulSet", "Service", "ConfigMap", "Secret", "PodDisruptionBudget"}
    listed = {(d["kind"], d["metadata"]["name"]) for d in _docs()}
    rendered = {(d["kind"], d["metadata"]["name"]) for d in built}
    assert listed - {("ConfigMap", "stream-app-campaigns")} <= rendered  # generated: its name gets a hash
    (campaigns,) = [
        d for d in built if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("stream-app-campaigns-")
    ]
    assert campaigns["data"]["campaigns.yaml"] == (K8S / "campaigns.yaml").read_text()
    (sts,) = [d for d in built if d["kind"] == "StatefulSet"]
    mounted = {v["configMap"]["name"] for v in sts["spec"]["template"]["spec"]["volumes"] if "configMap" in v}
    assert campaigns["metadata"]["name"] in mounted  # the generator's hash reached the reference (a roll on change)
    for doc in built:
        kubernetes_validate.validate(doc, VERSION, strict=True)
        assert doc["kind"] == "Namespace" or doc["metadata"]["namespace"] == "stream-app"


def test_worker_probes_grace_and_resources():
    spec = _worker()["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    settings = yaml.safe_load((K8S / "configmap.yaml").read_text())["data"]
    shutdown = float(settings["STREAM_APP_SHUTDOWN_TIMEOUT_S"])
    assert spec["terminationGracePeriodSeconds"] > shutdown
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    assert c["ports"][0]["containerPort"] == int(settings["STREAM_APP_WEB_PORT"])
    assert _worker()["spec"]["replicas"] <= int(settings["STREAM_APP_TOPIC_PARTITIONS"])


def test_config_map_holds_only_real_settings_and_secrets_stay_in_the_secret():
    data = yaml.safe_load((K8S / "configmap.yaml").read_text())["data"]
    known = {f"STREAM_APP_{n.upper()}" for n in Settings.model_fields}
    assert set(data) <= known, set(data) - known
    assert "STREAM_APP_BROKER_PASSWORD" not in data
    Settings.model_validate({k.removeprefix("STREAM_APP_").lower(): v for k, v in data.items()})
    secret = yaml.safe_load((K8S / "secret.yaml").read_text())["stringData"]
    assert "STREAM_APP_BROKER_PASSWORD" in secret


def test_campaign_file_in_the_config_map_is_valid():
    campaigns, _ = load_campaigns(K8S / "campaigns.yaml")
    assert campaigns
