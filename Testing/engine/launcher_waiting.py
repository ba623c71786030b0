"""Waiting on a JobLauncher in tests: drain it as a GUI timer would until an event matches."""

from __future__ import annotations

import time


def wait_for_event(launcher, predicate, timeout: float = 30.0) -> dict:
    """The first drained event for which ``predicate`` is true (bounded; not a timing test)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in launcher.drain():
            if predicate(event):
                return event
        if launcher.done:
            break
        time.sleep(0.02)
    raise AssertionError(f"no matching event; events so far: {launcher.events()}")
