"""Guards for every test: no leaked threads, no blocked event loop.

Asyncio debug mode is switched on for the whole run, so every event loop reports callbacks that run too
long; the ``_guard`` fixture turns a callback that held the loop for more than ``BLOCK_LIMIT_S`` into a test
failure (a generous limit: CI machines are small and noisy, and the point is to catch blocking I/O, not to
time code).  Threads that a test starts must be gone when it ends.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator

import pytest

os.environ.setdefault("PYTHONASYNCIODEBUG", "1")

BLOCK_LIMIT_S = 1.0
THREAD_GRACE_S = 5.0


class _SlowCallbacks(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.slow: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not str(record.msg).startswith("Executing"):
            return
        args = record.args if isinstance(record.args, tuple) else ()
        took = args[-1] if args and isinstance(args[-1], float) else 0.0
        if took > BLOCK_LIMIT_S:
            self.slow.append(record.getMessage())


@pytest.fixture(autouse=True)
def _guard(request: pytest.FixtureRequest) -> Iterator[None]:
    before = set(threading.enumerate())
    handler = _SlowCallbacks()
    asyncio_logger = logging.getLogger("asyncio")
    asyncio_logger.addHandler(handler)
    try:
        yield
    finally:
        asyncio_logger.removeHandler(handler)
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    for thread in leaked:
        thread.join(THREAD_GRACE_S / max(1, len(leaked)))
    leaked = [t for t in leaked if t.is_alive()]
    if request.node.get_closest_marker("allow_threads") is None:
        assert not leaked, f"test leaked threads: {[t.name for t in leaked]}"
    assert not handler.slow, f"the event loop was blocked: {handler.slow}"
