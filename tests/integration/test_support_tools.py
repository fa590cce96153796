"""The support tools against the real broker: `topics --check` finds real mismatches, `explain` reads a user's
state and decisions from the topics, `campaigns check` and `--version`."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import orjson

from stream_app.kafka_io import create_topics, produce
from tests.integration.conftest import running_worker, wait_until


def _cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stream_app", *args], env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def test_topics_check_reports_wrong_partitions_and_compaction(app_settings, worker_env, kafka_bootstrap):
    s = app_settings
    bad = {s.clicks_topic: (2, {}), s.model_params_topic: (1, {})}  # 2 partitions, and not compacted
    asyncio.run(create_topics(kafka_bootstrap, bad))
    made = _cli(worker_env, "topics")
    assert made.returncode == 0, made.stderr
    check = _cli(worker_env, "topics", "--check")
    assert check.returncode == 1
    assert f"MISMATCH {s.clicks_topic}: partition count is 2, the app needs {s.topic_partitions}" in check.stdout
    assert f"MISMATCH {s.model_params_topic}: cleanup.policy is delete, the app needs compact" in check.stdout
    assert check.stdout.count("MISMATCH") == 2, check.stdout


def test_explain_reads_state_and_decisions_from_the_topics(app_settings, worker_env, kafka_bootstrap, tmp_path):
    s = app_settings
    assert _cli(worker_env, "topics").returncode == 0
    assert _cli(worker_env, "topics", "--check").returncode == 0
    t0 = int(time.time() * 1000) - 86_400_000
    events = [{"event_id": f"e{i}", "type": "click", "user_id": "alice", "ts": t0 + i * 60_000,
               "category": "games"} for i in range(6)]  # fmt: skip
    records = [(s.clicks_topic, b"alice", orjson.dumps(e)) for e in events]
    records.append((s.consent_topic, b"bob", b'{"user_id": "bob", "action": "opt_out", "source": "app"}'))
    log = tmp_path / "worker.log"
    with running_worker(worker_env, log) as proc:
        import urllib.request

        def ready() -> bool:
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{s.web_port}/readyz", timeout=2).status == 200
            except OSError:
                return False

        wait_until(ready, 90, proc, log, "/readyz")
        asyncio.run(produce(kafka_bootstrap, [(t, k, v) for t, k, v in records]))

        def handled() -> bool:
            body = urllib.request.urlopen(f"http://127.0.0.1:{s.web_port}/metrics", timeout=2).read().decode()
            return 'stream_app_events_consumed_total{type="click"} 6.0' in body and 'opt_out"} 1.0' in body

        wait_until(handled, 90, proc, log, "events and consent handled")
    out = _cli(worker_env, "explain", "alice")
    assert out.returncode == 0, out.stderr
    assert "consent: pushes allowed" in out.stdout
    assert "events: clicks 6, likes 0, payments 0" in out.stdout
    assert "top categories: games" in out.stdout
    assert "cart_abandonment" in out.stdout and "reasons: eligible:clicks>=3" in out.stdout
    bob = _cli(worker_env, "explain", "bob")
    assert "OPTED OUT" in bob.stdout and "profile: none yet" in bob.stdout


def test_campaigns_check_and_version(worker_env, tmp_path):
    ok = _cli(worker_env, "campaigns", "check", "stream_app/campaigns.default.yaml")
    assert ok.returncode == 0 and "click    -> cart_abandonment" in ok.stdout and "lapse    -> winback" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("campaigns:\n  - name: x\n    triggers: [tap]\n")
    err = _cli(worker_env, "campaigns", "check", str(bad))
    assert err.returncode == 1 and "campaigns.0.triggers" in err.stderr and "unknown trigger" in err.stderr
    version = _cli(worker_env, "--version")
    assert version.returncode == 0 and version.stdout.startswith("stream-app 0.1.0")
