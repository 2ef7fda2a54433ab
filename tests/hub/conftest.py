"""Fixtures for hub tests: a real hub on a loopback port, a paired client, simulated modules."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from devices.model import Capabilities, DeviceInfo, DeviceKind, Identity, Telemetry
from devices.sim.base import SimServer, StaticModule
from devices.sim.ores_http_server import start_ores_http_server
from hub.app import build_app
from hub.config import HubConfig
from hub.context import HubContext, hub_key
from tests.serving import serving

FAST_SETTINGS = {"hub": {"poll_interval_s": 0.2, "timeout_s": 1.0, "offline_after": 2, "cyclic_write_s": 1.0}}


class Hub:
    """A running hub and an HTTP session to it."""

    def __init__(self, server: TestServer, session: aiohttp.ClientSession, app: web.Application) -> None:
        self.server = server
        self.session = session
        self.app = app
        self.token: str | None = None

    @property
    def ctx(self) -> HubContext:
        return self.app[hub_key]

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))

    def headers(self, token: str | None = None) -> dict[str, str]:
        tok = token if token is not None else self.token
        return {"Authorization": f"Bearer {tok}"} if tok else {}

    async def request(
        self, method: str, path: str, *, token: str | None = None, json_body: Any = None, **kw: Any
    ) -> tuple[int, Any]:
        headers = {**self.headers(token), **kw.pop("headers", {})}
        async with self.session.request(
            method, self.url(path), json=json_body, headers=headers, **kw
        ) as resp:
            text = await resp.text()
            try:
                body = json.loads(text) if text else None
            except ValueError:
                body = text
            return resp.status, body

    async def pair(self, code: str, name: str = "test") -> dict[str, Any]:
        status, body = await self.request(
            "POST", "/auth/pair", token="", json_body={"code": code, "name": name}
        )
        assert status == 201, body
        return dict(body)

    async def token_for(self, role: str) -> str:
        status, body = await self.request("POST", "/auth/pairing-code", json_body={"role": role})
        assert status == 201, body
        return str((await self.pair(body["code"], f"{role} client"))["token"])


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "hub"
    d.mkdir()
    (d / "settings.json").write_text(json.dumps(FAST_SETTINGS))
    return d


@pytest.fixture
async def hub(data_dir: Path) -> AsyncIterator[Hub]:
    app = build_app(HubConfig(data_dir=data_dir, device_networks=("127.0.0.0/8",), allow_local_names=False))
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    session = aiohttp.ClientSession()
    h = Hub(server, session, app)
    code = h.ctx.auth.pairing_code
    assert code is not None
    h.token = (await h.pair(code, "installer"))["token"]
    try:
        yield h
    finally:
        await session.close()
        await server.close()


def make_module(kind: DeviceKind, serial: str, **sample: Any) -> StaticModule:
    caps = {
        DeviceKind.MICROINVERTER: Capabilities(rated_power_w=400),
        DeviceKind.ENERGYSTORAGE: Capabilities(
            rated_power_w=2500,
            capacity_wh=5000,
            max_charge_w=2500,
            max_discharge_w=2500,
            min_soc_pct=10,
            max_soc_pct=100,
        ),
        DeviceKind.METER: Capabilities(controllable=False),
        DeviceKind.SMARTPLUG: Capabilities(rated_power_w=1800, priority=1),
    }[kind]
    info = DeviceInfo(kind, Identity("Test Vendor", f"T-{kind.value}", serial, "1.0.0"), caps)
    defaults: dict[str, Any] = {
        DeviceKind.MICROINVERTER: {"power_w": 300.0, "power_limit_pct": 100.0, "energy_out_wh": 1000.0},
        DeviceKind.ENERGYSTORAGE: {
            "power_w": -500.0,
            "soc_pct": 55.0,
            "soh_pct": 98.0,
            "temperature_c": 25.0,
        },
        DeviceKind.METER: {"power_w": 200.0, "grid_ok": True},
        DeviceKind.SMARTPLUG: {"power_w": -60.0, "on": True},
    }[kind]
    return StaticModule(info, Telemetry(ts=0.0, **{**defaults, **sample}))


ModuleFactory = Callable[..., Awaitable[SimServer]]


@pytest.fixture
async def ores_module() -> AsyncIterator[ModuleFactory]:
    """Start ORES-HTTP simulated modules; all are stopped at the end."""
    async for start in serving(start_ores_http_server):
        yield start
