"""Integration-test hygiene shared by every test in this folder."""

import pytest

from .worker_harness import kill_leftovers


@pytest.fixture(autouse=True)
def _no_leftover_workers():
    """Kill worker processes a test left running (a failed assertion skips its own cleanup)."""
    yield
    kill_leftovers()
