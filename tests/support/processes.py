"""Watching a job started as a child process: its log's tail, and polling for a state."""

from __future__ import annotations

import time


def tail(path, n: int = 3000) -> str:
    """The last ``n`` characters of a log file."""
    with open(path) as f:
        return f.read()[-n:]


def wait_until(condition, proc, timeout: float = 180, poll_s: float = 0.2) -> bool:
    """Poll ``condition()`` every ``poll_s``; False once ``proc`` ends or the time runs out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll_s)
    return False
