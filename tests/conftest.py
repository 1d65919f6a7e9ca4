"""Shared test settings: deterministic hypothesis profiles for CI; no frozen objects left behind."""

import gc
import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=100, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture(autouse=True)
def _unfreeze_the_collector():
    """``tap.makeService`` freezes what exists (right for a node process); the
    test process must keep collecting it."""
    yield
    gc.unfreeze()


@pytest.fixture(autouse=True)
def _keep_the_reactor_on_its_clock(monkeypatch):
    """``tap.makeService`` moves the reactor's timers to monotonic time (right
    for a node process); the tests share one reactor and keep it as it is."""
    import paxchat.clocks
    monkeypatch.setattr(paxchat.clocks, "run_timers_on_monotonic_time", lambda reactor: None)
