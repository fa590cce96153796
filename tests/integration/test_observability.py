"""The dashboard and the alert rules against a real Prometheus scraping a real worker under the simulator's load.

Every panel query of deploy/grafana/dashboards/stream_app.json and every rule expression of
deploy/prometheus/alerts.yml goes through Prometheus' HTTP API: each must parse, the recording rule and the
panels listed as fed by this load must return data, every rule must evaluate without error. Also: the
worker's /metrics passes ``promtool check metrics`` silently, /healthz and /readyz answer, logs are JSON.
Needs Debian's ``prometheus`` package (``.ci/run`` installs it); without it the test fails, it never skips.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import free_port, running_worker, wait_until

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = json.loads((ROOT / "deploy/grafana/dashboards/stream_app.json").read_text())
RULES = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
# panels this load cannot feed: no user is erased or repartitioned-only, uplift needs converted labels of
# both pushed and holdout users (rare in 7 simulated days of 300 users)
MAY_BE_EMPTY = {"Uplift per campaign (pushed minus holdout conversion)"}


def _get(url: str, timeout: float = 5) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return 0, ""


def _query(prom: str, expr: str) -> dict:
    status, body = _get(f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert status in (200, 400, 422), (expr, status, body)
    return json.loads(body)


def _panels() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in DASHBOARD["panels"] for t in p.get("targets", [])]


def test_dashboard_and_alerts_against_a_live_worker_under_load(app_settings, worker_env, tmp_path):
    prometheus = shutil.which("prometheus")
    promtool = shutil.which("promtool")
    if not (prometheus and promtool):
        pytest.fail("needs Debian's prometheus package (promtool, prometheus): apt-get install prometheus")
    env = {**worker_env, "STREAM_APP_LOG_FORMAT": "json"}
    made = subprocess.run([sys.executable, "-m", "stream_app", "topics"], env=env, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    web = f"http://127.0.0.1:{app_settings.web_port}"
    log = tmp_path / "worker.log"
    with running_worker(env, log) as proc:
        wait_until(lambda: _get(f"{web}/readyz")[0] == 200, 90, proc, log, "/readyz 200")
        status, body = _get(f"{web}/healthz")
        assert status == 200 and json.loads(body)["status"] == "ok"
        ready = json.loads(_get(f"{web}/readyz")[1])
        assert set(ready["checks"]) == {"assigned", "state", "models"} and ready["status"] == "ready"

        port = free_port()
        prom = f"http://127.0.0.1:{port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ROOT / "deploy/prometheus/alerts.yml")],
            "scrape_configs": [{"job_name": "stream_app", "static_configs": [
                {"targets": [f"127.0.0.1:{app_settings.web_port}"]}]}],
        }  # fmt: skip
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        with open(tmp_path / "prometheus.log", "wb") as plog:
            server = subprocess.Popen(
                [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{port}"], stdout=plog, stderr=plog,
            )  # fmt: skip
        try:
            wait_until(lambda: _get(f"{prom}/-/ready")[0] == 200, 60, proc, log, "prometheus ready")
            sim = subprocess.run(
                [sys.executable, "-m", "stream_app", "simulate", "--users", "300", "--days", "7", "--seed", "3",
                 "--kafka"], env=env, capture_output=True, text=True, timeout=240,
            )  # fmt: skip
            assert sim.returncode == 0, sim.stderr[-2000:]

            def caught_up() -> bool:
                data = _query(prom, "sum(stream_app:consumer_lag:sum)")["data"]["result"]
                decided = _query(prom, "sum(stream_app_decisions_total)")["data"]["result"]
                return bool(data and decided) and float(data[0]["value"][1]) == 0 and float(decided[0]["value"][1]) > 0

            wait_until(caught_up, 180, proc, log, "lag 0 and decisions in Prometheus")
            time.sleep(3)  # a few more scrapes inside the rate windows

            empty, bad = [], []
            for title, expr in _panels():
                answer = _query(prom, expr)
                if answer["status"] != "success":
                    bad.append((title, expr, answer.get("error")))
                elif not answer["data"]["result"] and title not in MAY_BE_EMPTY:
                    empty.append((title, expr))
            assert not bad, bad
            assert not empty, f"panels without data under load: {empty}"

            rules = [r for g in RULES["groups"] for r in g["rules"]]
            for rule in rules:
                answer = _query(prom, rule["expr"])
                assert answer["status"] == "success", (rule, answer)
            assert _query(prom, "stream_app:consumer_lag:sum")["data"]["result"]
            groups = json.loads(_get(f"{prom}/api/v1/rules")[1])["data"]["groups"]
            loaded = [r for g in groups for r in g["rules"]]
            assert len(loaded) == len(rules)
            assert all(r["health"] == "ok" for r in loaded), [(r["name"], r.get("lastError")) for r in loaded]
            firing = [a["labels"]["alertname"] for a in json.loads(_get(f"{prom}/api/v1/alerts")[1])["data"]["alerts"]]
            assert "StreamAppWorkerDown" not in firing and "StreamAppNoDecisions" not in firing

            text = _get(f"{web}/metrics")[1]
            check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
            assert check.stdout + check.stderr == "", check.stdout + check.stderr
            assert "faust_rebalances_total" in text and "faust_topic_partition_offset_committed" in text
            assert "_ms" not in "".join(line.split("{")[0] for line in text.splitlines() if line.startswith("faust"))
        finally:
            server.terminate()
            server.wait(30)
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    assert lines and all(json.loads(line)["level"] for line in lines[:50])
