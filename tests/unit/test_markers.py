"""``-m "not integration"`` deselects every broker test and nothing else (checked by a real collection)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def _collected(*args: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args, "tests"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return {line for line in out.stdout.splitlines() if "::" in line}


def test_not_integration_deselects_every_broker_test_and_only_those():
    everything = _collected()
    fast = _collected("-m", "not integration")
    broker = _collected("-m", "integration")
    assert broker and fast
    assert all(t.startswith("tests/integration/") for t in broker)
    assert not any(t.startswith("tests/integration/") for t in fast)
    assert fast | broker == everything
