"""deploy/k8s: every manifest validated against the Kubernetes API schemas (kubernetes-validate, strict: unknown
fields fail), the kustomize build when kubectl is installed, and the settings the manifests rely on."""

from __future__ import annotations

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


def test_kustomize_build_validates():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("needs kubectl for `kubectl kustomize` (.ci/run installs it)")
    out = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    built = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert {d["kind"] for d in built} >= {"StatefulSet", "Service", "ConfigMap", "Secret", "PodDisruptionBudget"}
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
