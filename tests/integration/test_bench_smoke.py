"""The benchmark harness end to end at toy size on the real broker: it must work, not be fast.

Every phase runs (raw loop, minimal Faust, both pipeline guarantees, scale, recovery, latency, memory)
and the result files carry a number for each, so a broken phase fails CI instead of a benchmark night.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_harness_runs_every_phase_and_writes_its_results(kafka_bootstrap, tmp_path):
    cmd = [sys.executable, "-m", "bench", "--bootstrap", kafka_bootstrap, "--events", "3000", "--users", "300",
           "--runs", "1", "--latency-seconds", "3", "--latency-warmup", "1", "--stop-timeout", "20",
           "--run-timeout", "240", "--out", str(tmp_path), "--name", "smoke"]  # fmt: skip
    # its own process group: if the test fails or times out, no worker the bench started outlives it (a
    # worker whose broker is gone does not stop on SIGTERM)
    bench = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = bench.communicate(timeout=900)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(bench.pid, signal.SIGKILL)
    assert bench.returncode == 0, stdout[-3000:] + stderr[-3000:]
    res = json.loads((tmp_path / "smoke.json").read_text())
    for key in ("a_raw_aiokafka", "b_minimal_faust", "c_pipeline_alo", "d_pipeline_eos"):
        (run,) = res[key]["runs"]
        assert run["events"] == 3000 and run["events_per_s"] > 0 and run["events_per_cpu_s"] > 0, key
    for key in ("c_pipeline_alo", "d_pipeline_eos"):
        assert res[key]["runs"][0]["consumed"] == 3000  # every preloaded event went through the pipeline
    assert res["scale"]["two_workers"]["runs"][0]["events_per_s"] > 0 and res["scale"]["speedup"] > 0
    # the machine's share: busy cores, stolen cores (VM), and the scale two workers could reach on it
    two = res["scale"]["two_workers"]["runs"][0]
    assert 0 < two["machine_cores"] <= os.cpu_count() + 0.2 and two["steal_cores"] >= 0
    assert res["scale"]["machine_ceiling"] >= 1.0
    for guarantee in ("at_least_once", "exactly_once"):
        (lat,) = res["latency"][guarantee]["runs"]
        assert lat["decisions_seen"] > 0 and 0 < lat["p50_ms"] <= lat["p99_ms"] <= lat["max_ms"]
        assert lat["worker_sent_p50_ms"] <= lat["p50_ms"] and lat["catch_up_s"] > 0
        assert lat["machine_cpu_cores"] >= lat["worker_cpu_cores"] > 0 and lat["steal_cpu_cores"] >= 0
        assert res["latency"][guarantee]["p99_ms"]["median"] == lat["p99_ms"]
        assert res["recovery"][guarantee]["restart_to_first_event_s"] > 0
        assert res["recovery"][guarantee]["keys_recovered"] > 0
    assert 0 < res["memory"]["state_bytes_mean"] < 4096 and res["memory"]["users_in_state"] > 0
    assert {"c/a events_per_cpu_s", "d/a events_per_cpu_s", "d/b events_per_cpu_s"} <= set(res["ratios"])
    md = (tmp_path / "smoke.md").read_text()
    assert "## Targets" in md and "## Latency" in md and (tmp_path / "smoke.png").stat().st_size > 100
