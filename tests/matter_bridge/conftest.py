"""Shared by the Matter tests: a hub with the bridge that can be stopped and started again on one data
directory, and the hub tests' fixtures (data directory with fast settings, simulated ORES-HTTP modules)."""

from __future__ import annotations

import socket
from pathlib import Path

import aiohttp
from aiohttp.test_utils import TestServer

from hub.app import build_app
from hub.config import HubConfig, MatterConfig
from tests.hub.conftest import Hub, data_dir, ores_module  # noqa: F401  (re-exported fixtures)


def free_udp_port() -> int:
    """A UDP port free on IPv4 and IPv6 (the bridge binds both)."""
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", 0))
        return int(sock.getsockname()[1])


class MatterHub:
    """Start and restart a hub with the Matter bridge on one data directory."""

    def __init__(self, directory: Path, config: MatterConfig) -> None:
        self.data_dir = directory
        self.config = config
        self.hub: Hub | None = None
        self._server: TestServer | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> Hub:
        app = build_app(
            HubConfig(
                data_dir=self.data_dir,
                device_networks=("127.0.0.0/8",),
                allow_local_names=False,
                matter=self.config,
            )
        )
        self._server = TestServer(app, host="127.0.0.1")
        await self._server.start_server()
        self._session = aiohttp.ClientSession()
        hub = Hub(self._server, self._session, app)
        if hub.ctx.matter is not None:
            await hub.ctx.matter.started()
        if hub.ctx.auth.pairing_code is not None:
            hub.token = (await hub.pair(hub.ctx.auth.pairing_code, "installer"))["token"]
        elif self.hub is not None:
            hub.token = self.hub.token
        self.hub = hub
        return hub

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._server is not None:
            await self._server.close()
        self._session = self._server = None
