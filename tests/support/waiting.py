"""Waiting in a test for something another process does."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 120, interval: float = 1) -> Any:
    """`condition()`'s first truthy value, asked every `interval` seconds; AssertionError naming `what` after
    `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")
