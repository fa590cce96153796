"""Marks every test under tests/integration as ``integration``.

A ``pytestmark`` in a conftest.py marks nothing (pytest reads it from test modules only), so
``-m "not integration"`` used to select the broker tests too; this hook marks them by location.
"""

from __future__ import annotations

from pathlib import Path

import pytest

INTEGRATION = Path(__file__).parent / "integration"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION in Path(item.fspath).parents:
            item.add_marker(pytest.mark.integration)
