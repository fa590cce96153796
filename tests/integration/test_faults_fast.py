"""The fault matrix's fast subset (`python -m faults --fast`): every scenario once under exactly_once, two of
them under at_least_once too, on a real local broker this test's run starts (and may SIGKILL: never the suite's
shared broker), each checked by the independent read_committed verifier against replay.

It runs in every CI run (about 12-15 minutes): every scenario passed 3 of 3 runs in the matrix
(bench/results/faults-matrix-eos.md), so none is left out.
The broker port is ``STREAM_APP_FAULTS_KAFKA_PORT`` (default: the
integration tests' port + 2).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from faults.scenarios import FAST_ALO, SCENARIOS

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


@pytest.mark.timeout(1800)
def test_every_fast_scenario_keeps_every_invariant(tmp_path):
    run_matrix(tmp_path, None)


def run_matrix(tmp_path: Path, scenarios: list[str] | None) -> None:
    port = os.environ.get("STREAM_APP_FAULTS_KAFKA_PORT") or str(int(os.environ.get("STREAM_APP_TEST_KAFKA_PORT",
                                                                                     "19092")) + 2)  # fmt: skip
    cmd = [sys.executable, "-m", "faults", "--fast", "--port", port, "--out", str(tmp_path), "--name", "fast"]
    cmd += [arg for name in scenarios or [] for arg in ("--scenario", name)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1750)
    print(proc.stdout[-5000:])
    results = tmp_path / "faults-fast.json"
    assert results.exists(), f"no results (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    res = json.loads(results.read_text())
    print((tmp_path / "faults-fast.md").read_text())

    ran = {(r["scenario"], r["guarantee"]) for r in res["runs"]}
    fast = set(scenarios or [n for n, s in SCENARIOS.items() if s.fast])
    assert {(n, "exactly_once") for n in fast} <= ran, "every chosen scenario ran under exactly_once"
    assert {(n, "at_least_once") for n in FAST_ALO if n in fast} <= ran

    failures = []
    for r in res["runs"]:
        if "invariants" not in r:
            failures.append(f"{r['scenario']} {r['guarantee']} run {r['run']}: {r.get('error')}")
            continue
        broken = [k for k in r["required"] if not r["invariants"][k]]
        assert r["passed"] == (not broken)
        if broken:
            n = r["numbers"]
            failures.append(
                f"{r['scenario']} {r['guarantee']} run {r['run']}: {', '.join(broken)} (duplicates push/audit/DL/"
                f"label {n['dup_pushes']}/{n['dup_audit']}/{n['dup_dead_letters']}/{n['dup_labels']}, applied twice"
                f" {n['events_applied_twice']}, lost {n['events_lost']}, dead letters missing "
                f"{n['dead_letters_missing']}, decision differences {n['decision_differences']}, true lag "
                f"{n['lag_true']}, reported lag {n['lag_reported']})"
            )
    assert not failures, "invariants broken:\n" + "\n".join(failures)
    assert proc.returncode == 0
