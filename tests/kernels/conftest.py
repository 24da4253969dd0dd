"""Fixtures shared by the engine tests of test_abinitio.py and test_hetero.py."""

from __future__ import annotations

import pytest
from abinitio_runs import states_set
from sim3d import Set3D


@pytest.fixture(scope="module")
def states() -> Set3D:
    """The 3-state set (``abinitio_runs.states_set``), once per module."""
    return states_set()
