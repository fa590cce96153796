"""The README's run command (`stream-app demo`) end to end, as a newcomer runs it: no broker answering, so it
starts the project's own local Kafka, runs a simulated population through a real worker, reports, explains a
pushed user, and stops the worker and the broker it started."""

import os
import re
import socket
import subprocess
import sys

from stream_app.kafka_local import LocalKafka, metadata_round_trip
from tests.integration.conftest import free_port


def _adjacent_free(port: int) -> bool:
    """``port`` and ``port + 1`` (the local broker's controller) are free."""
    for p in (port, port + 1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                return False
    return True


def _demo_port() -> int:
    """Two ports above the suite's broker (STREAM_APP_TEST_KAFKA_PORT, so a shared machine's port plan holds),
    else any two adjacent free ports."""
    if base := int(os.environ.get("STREAM_APP_TEST_KAFKA_PORT", "0")):
        assert _adjacent_free(base + 2), f"ports {base + 2} and {base + 3} are taken"
        return base + 2
    for _ in range(20):
        if _adjacent_free(port := free_port()):
            return port
    raise RuntimeError("no two adjacent free ports")


def test_demo_tells_the_story_and_stops_what_it_started(tmp_path):
    port = _demo_port()
    env = {
        **os.environ,
        "STREAM_APP_BROKER": f"kafka://127.0.0.1:{port}",
        "STREAM_APP_WEB_PORT": str(free_port()),
        "STREAM_APP_DATADIR": str(tmp_path / "data"),
    }
    # 400 users over 3 days, about 6,500 messages, paced so that the models learn while the days pass
    proc = subprocess.run(
        [sys.executable, "-m", "stream_app", "demo", "--users", "400", "--days", "3", "--rate", "600"],
        env=env, capture_output=True, text=True, timeout=480,
    )  # fmt: skip
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-3000:]
    print(out)
    assert "starting a local Apache Kafka" in out
    m = re.search(r"(\d+) decisions in decision-audit-demo-\d+: (\d+) pushes, (\d+) holdouts .*?, (\d+) suppressions; "
                  r"(\d+) records for the push services", out)  # fmt: skip
    assert m, out
    decisions, pushes, holdouts, suppressions, sent = map(int, m.groups())
    assert pushes > 0 and holdouts > 0 and suppressions > 0
    assert decisions == pushes + holdouts + suppressions and sent == pushes
    # the table: every action, with its reasons, and the rule behind each suppression
    assert re.search(r"cart_abandonment\s+push\s+\d+\s+(score>=threshold|cold-start exploration)", out)
    assert re.search(r"cart_abandonment\s+holdout\s+\d+", out)
    assert re.search(r"cart_abandonment\s+suppress\s+\d+\s+(below_threshold|campaign_cooldown)", out)
    assert re.search(r"[1-9]\d* dead letters in dead-letters-demo-\d+, by reason: \w+ \d+", out)
    assert re.search(r"exactly once: (\d+) of \1 events applied, (\d+) of \2 duplicates dropped, (\d+) of \3 "
                     r"malformed dead-lettered; decisions counted in metrics = decisions in the audit topic: yes",
                     out)  # fmt: skip
    # one decision explained by `stream-app explain`, read back from the topics: the push and its reasons
    m = re.search(r"why did (\S+) get a push\?", out)
    assert m, out
    explained = out[m.end() :]
    assert f"user '{m.group(1)}': partition" in explained and "consent: pushes allowed" in explained
    assert re.search(r"cart_abandonment: PUSH score [\d.]+ segment -?\d+ model v\d+\n\s+reasons: eligible:", explained)
    assert "/metrics" in out and "grafana" in out.lower() and "stream_app_decisions_total{" in out
    # it stopped what it started
    assert "worker and broker stopped" in out
    assert not metadata_round_trip(f"127.0.0.1:{port}", timeout=2)
    assert LocalKafka(port=port).pid() is None
