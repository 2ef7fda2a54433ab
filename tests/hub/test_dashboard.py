"""The web dashboard (hub/static/index.html) end to end, in real headless Chromium against a real hub.

A hub with four simulated ORES-HTTP modules (microinverter, battery, meter, smart plug) serves the page; the
browser pairs through the form as a user would (typing, clicking), then the test checks that the live view
shows what the hub's REST API reports, that a change on a module reaches the page through the push stream,
that a wrong code is refused with the hub's message, and that the Matter card says the bridge is off.
"""

from __future__ import annotations

import asyncio
import math
import struct
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Final

import pytest

from devices.model import DeviceKind
from devices.sim.base import StaticModule
from tests.hub.browser import Browser, Page, chromium
from tests.hub.conftest import Hub, ModuleFactory, make_module
from tests.hub.test_api import register

pytestmark = pytest.mark.slow

DEADLINE_S: Final = 8.0
PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"

# Everything the test reads from the page, in one round trip.
SNAPSHOT_JS: Final = """(() => {
  const $ = (id) => document.getElementById(id);
  const text = (id) => $(id).textContent;
  return {
    pair_hidden: $("pair").hidden, live_hidden: $("live").hidden, pair_error: text("pair-error"),
    pv: text("pv"), battery: text("battery"), grid: text("grid"), load: text("load"), soc: text("soc"),
    rows: Array.from($("devices").rows, (r) => Array.from(r.cells, (c) => c.innerText)),
    matter_state: text("matter-state"), matter_window_hidden: $("matter-window").hidden,
    token_stored: localStorage.getItem("ores-token") !== null,
  };
})()"""


def watts(w: float | None) -> str:
    """The page's ``watts()``: "–" for none, kW with two decimals from 1 kW, else whole watts."""
    if w is None:
        return "–"
    if abs(w) >= 1000:
        return f"{w / 1000:.2f} kW"
    return f"{math.floor(w + 0.5)} W"  # JavaScript's Math.round rounds halves up


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async for b in chromium():
        yield b


async def poll(
    probe: Callable[[], Any], check: Callable[[Any], bool], what: str, timeout: float = DEADLINE_S
) -> Any:
    """Call ``probe`` (sync or async) until ``check`` accepts its value; fail with the last value seen."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if asyncio.iscoroutine(value):
            value = await value
        if check(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last seen: {value!r}")
        await asyncio.sleep(0.05)


async def snapshot(page: Page) -> dict[str, Any]:
    return dict(await page.evaluate(SNAPSHOT_JS))


async def monitor(hub: Hub) -> dict[str, Any]:
    status, body = await hub.request("GET", "/app/monitor")
    assert status == 200, body
    return dict(body)


def shows(view: dict[str, Any], rest: dict[str, Any]) -> bool:
    """The page's live view shows the REST monitor's flows and one row per module with its power."""
    site = rest["site"]
    if view["live_hidden"] or (view["pv"], view["battery"], view["grid"], view["load"]) != (
        watts(site["pv_w"]),
        watts(site["battery_w"]),
        watts(site["grid_w"]),
        watts(site["load_w"]),
    ):
        return False
    if len(view["rows"]) != len(rest["devices"]):
        return False
    for device in rest["devices"]:
        matching = [row for row in view["rows"] if device["device_id"] in row[0]]
        if len(matching) != 1:
            return False
        row = matching[0]
        if row[1] != device["kind"] or row[4] != watts((device["telemetry"] or {}).get("power_w")):
            return False
    return True


def png_size(data: bytes) -> tuple[int, int]:
    assert data.startswith(PNG_SIGNATURE), data[:16]
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


async def test_dashboard_pairs_and_shows_the_live_home(
    hub: Hub, ores_module: ModuleFactory, browser: Browser, tmp_path: Path
) -> None:
    modules: dict[DeviceKind, StaticModule] = {
        kind: make_module(kind, f"E2E-{kind.value}")
        for kind in (
            DeviceKind.ENERGYSTORAGE,
            DeviceKind.MICROINVERTER,
            DeviceKind.METER,
            DeviceKind.SMARTPLUG,
        )
    }
    for module in modules.values():
        server = await ores_module(module)
        status, body = await register(hub, str(server.address))
        assert status == 201, body

    page = await browser.new_page()
    await page.navigate(hub.url("/"))
    view = await poll(lambda: snapshot(page), lambda v: not v["pair_hidden"], "the pairing form")
    assert view["live_hidden"] and view["pair_error"] == "" and not view["token_stored"]

    # A wrong code: the form stays, with the hub's own message.
    status, refused = await hub.request(
        "POST", "/auth/pair", token="", json_body={"code": "0000-0000", "name": "x"}
    )
    assert status == 401, refused
    await page.type_into("#code", "0000-0000")
    await page.click("#pair button")
    view = await poll(lambda: snapshot(page), lambda v: v["pair_error"] != "", "the pairing error")
    assert view["pair_error"] == refused["error"]["message"]
    assert view["live_hidden"] and not view["pair_hidden"] and not view["token_stored"]

    # The right code, typed over the wrong one: the live view replaces the form.
    status, issued = await hub.request("POST", "/auth/pairing-code", json_body={"role": "homeowner"})
    assert status == 201, issued
    await page.type_into("#code", issued["code"])
    await page.click("#pair button")
    view = await poll(lambda: snapshot(page), lambda v: not v["live_hidden"], "the live view")
    assert view["pair_hidden"] and view["token_stored"]
    status, tokens = await hub.request("GET", "/auth/tokens")
    assert status == 200, tokens
    assert [t["role"] for t in tokens["tokens"] if t["name"].startswith("dashboard")] == ["homeowner"]

    # Every module online at the hub, and the page shows what the REST API reports.
    rest = await poll(
        lambda: monitor(hub),
        lambda m: len(m["devices"]) == 4 and all(d["online"] and d["telemetry"] for d in m["devices"]),
        "four modules online",
    )
    assert (
        rest["site"]["pv_w"] == 300.0
        and rest["site"]["battery_w"] == -500.0
        and rest["site"]["grid_w"] == 200.0
    )
    view = await poll(lambda: snapshot(page), lambda v: shows(v, rest), "the page to show the REST monitor")
    assert (view["pv"], view["battery"], view["grid"], view["soc"]) == ("300 W", "-500 W", "200 W", "55 %")

    # A change on a module reaches the page through the push stream (the page never polls the monitor).
    inverter = modules[DeviceKind.MICROINVERTER]
    inverter.sample = replace(inverter.sample, power_w=1500.0)
    rest = await poll(lambda: monitor(hub), lambda m: m["site"]["pv_w"] == 1500.0, "the hub to see 1500 W")
    view = await poll(lambda: snapshot(page), lambda v: shows(v, rest), "the page to show the new power")
    assert (view["pv"], view["load"]) == ("1.50 kW", "1.20 kW")

    # The hub runs without Matter: the card says so and offers no commissioning window.
    view = await poll(
        lambda: snapshot(page), lambda v: v["matter_state"] != "–", "the Matter card", timeout=DEADLINE_S
    )
    assert view["matter_state"] == "Matter bridge: off", view
    assert view["matter_window_hidden"]

    png = await page.screenshot()
    (tmp_path / "dashboard.png").write_bytes(png)
    width, height = png_size((tmp_path / "dashboard.png").read_bytes())
    assert width > 0 and height > 0
    assert len(png) > 10_000, len(png)
    assert page.exceptions == [], page.exceptions
