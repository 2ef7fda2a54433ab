"""Fixtures of the Matter end-to-end test: two network namespaces and two real Matter controllers.

``matter_lab`` (module scope) checks the prerequisites, creates namespaces A (for the hub's bridge) and B (for
the controllers) joined by a veth pair, exports the test PAA certificates and starts two python-matter-server
instances in B (fabric ids 1 and 2, each with its own directories), waiting until both answer.  At teardown
the servers' process groups are killed and the namespaces removed, together with anything still running in
them, even when the test failed.  ``controller`` and ``second_controller`` are connected, listening websocket
clients of those servers.  Without root, working ``ip netns``, ``node``, the bridge's ``node_modules`` or
``.venv-matter`` the tests are skipped with the reason, except on CI (``CI=true``), where they fail.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

from tests.matter_bridge.e2e.controller import (
    ControllerClient,
    MatterServer,
    e2e_unavailable,
    start_lab,
    stop_lab,
)
from tests.matter_bridge.e2e.netns import NetnsPair


def skip_or_fail(reason: str) -> NoReturn:
    """Skip the test, or fail it on CI (``CI=true``) where the set-up is expected to be complete."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"Matter end-to-end set-up incomplete on CI: {reason}")
    pytest.skip(f"Matter end-to-end set-up incomplete: {reason}")


@dataclass(frozen=True, slots=True)
class MatterLab:
    """The namespaces, the work directory and the running controllers (``servers[i]`` has fabric id i+1)."""

    netns: NetnsPair
    work: Path
    servers: tuple[MatterServer, ...]


@pytest.fixture(scope="module")
def matter_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MatterLab]:
    reason = e2e_unavailable()
    if reason:
        skip_or_fail(reason)
    work = tmp_path_factory.mktemp("matter")
    sock_dir = Path(tempfile.mkdtemp(prefix="ores-mt-"))  # short: a Unix socket path has 107 bytes at most
    try:
        netns, servers = start_lab(work, sock_dir)
        try:
            yield MatterLab(netns, work, tuple(servers))
        finally:
            stop_lab(netns, servers)
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


async def _client(server: MatterServer) -> AsyncIterator[ControllerClient]:
    client = server.client()
    await client.connect()
    try:
        await client.start_listening()
        yield client
    finally:
        await client.close()


@pytest.fixture
async def controller(matter_lab: MatterLab) -> AsyncIterator[ControllerClient]:
    """A listening client of the first controller (fabric id 1)."""
    async for client in _client(matter_lab.servers[0]):
        yield client


@pytest.fixture
async def second_controller(matter_lab: MatterLab) -> AsyncIterator[ControllerClient]:
    """A listening client of the second controller (fabric id 2)."""
    async for client in _client(matter_lab.servers[1]):
        yield client
