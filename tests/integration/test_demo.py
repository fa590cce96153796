"""The README's run command (`stream-app demo`) works end to end against a real broker."""

import os
import subprocess
import sys

from tests.integration.conftest import free_port


def test_demo_runs_and_reports_what_happened(kafka_bootstrap, tmp_path):
    env = {
        **os.environ,
        "STREAM_APP_BROKER": ";".join(f"kafka://{h}" for h in kafka_bootstrap.split(",")),
        "STREAM_APP_WEB_PORT": str(free_port()),
        "STREAM_APP_DATADIR": str(tmp_path),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "stream_app", "demo", "--users", "10", "--events", "200"],
        env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "using the Kafka broker already answering" in out  # it never starts a second broker
    assert 'stream_app_events_rejected_total{reason="malformed_json"} 1.0' in out
    assert "state (table users, read back from Kafka topic" in out and ": 10 users" in out
    assert "decisions (decision-audit-demo-" in out
    assert "holds 2 records" in out
