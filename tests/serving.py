"""One way for tests to start simulated endpoints and be sure every one is stopped afterwards."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

S = TypeVar("S")


async def serving(start: Callable[..., Awaitable[S]]) -> AsyncIterator[Callable[..., Awaitable[S]]]:
    """An async-generator body for a fixture: yields ``start`` wrapped so that every server it made is
    stopped (``await server.stop()``) when the fixture ends, even if the test failed."""
    made: list[Any] = []

    async def _start(*args: Any, **kwargs: Any) -> S:
        server = await start(*args, **kwargs)
        made.append(server)
        return server

    try:
        yield _start
    finally:
        for server in made:
            await server.stop()
