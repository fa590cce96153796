"""The alert rules' unit tests (promtool), and the dashboard's structure. Their queries run against a live
Prometheus in tests/integration/test_observability.py."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"


def _promtool() -> str:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.fail("needs promtool (Debian package prometheus; .ci/run installs it)")
    return tool


def test_alert_rules_pass_their_promtool_unit_tests():
    check = subprocess.run([_promtool(), "check", "rules", "alerts.yml"], cwd=PROM, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    run = subprocess.run([_promtool(), "test", "rules", "alerts_test.yml"], cwd=PROM, capture_output=True, text=True)
    assert run.returncode == 0 and "SUCCESS" in run.stdout, run.stdout + run.stderr


def test_every_alert_has_a_firing_unit_test():
    rules = yaml.safe_load((PROM / "alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load((PROM / "alerts_test.yml").read_text())["tests"]
    fired = {c["alertname"] for t in tests for c in t.get("alert_rule_test", []) if c["exp_alerts"]}
    quiet = {c["alertname"] for t in tests for c in t.get("alert_rule_test", []) if not c["exp_alerts"]}
    assert alerts == fired and alerts == quiet
    assert alerts >= {"StreamAppWorkerDown", "StreamAppLagGrowing", "StreamAppDeadLetterRate", "StreamAppNoDecisions",
                      "StreamAppModelQualityDrop", "StreamAppUpliftNegative", "StreamAppRecoverySlow"}  # fmt: skip


def test_prometheus_config_loads_the_rules_and_passes_promtool():
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert "./deploy/prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in compose["prometheus"]["volumes"]


def test_dashboard_covers_what_operators_watch():
    dash = json.loads((ROOT / "deploy/grafana/dashboards/stream_app.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p.get("targets", []))
    watched = (
        "stream_app_events_consumed_total", "stream_app:consumer_lag:sum", "stream_app_events_rejected_total",
        "stream_app_decisions_total", "stream_app_suppressions_total", "stream_app_event_to_decision_seconds",
        "stream_app_uplift", "stream_app_model_roc_auc", "stream_app_state_bytes", "faust_rebalances_total",
        "stream_app_pushes_held_total", "stream_app_model_versions_rejected_total",
    )  # fmt: skip
    for metric in watched:
        assert metric in exprs, metric
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    assert all(t["datasource"]["uid"] == "${datasource}" for p in dash["panels"] for t in p.get("targets", []))
