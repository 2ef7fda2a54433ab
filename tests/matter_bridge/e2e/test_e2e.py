"""The hub's Matter bridge against a real Matter controller (python-matter-server 7.0.1, the CHIP SDK).

The hub runs in this process, in the root network namespace, with four simulated ORES-HTTP modules on
loopback and its Matter bridge started in namespace A (``ip netns exec``); the controllers run in namespace
B (see conftest.py).  One scenario, in the order of the issue, because every step builds on the commissioned
node of the one before: commissioning with the hub's manual code; the node's layout; values equal to the
hub's REST values; On/Off switching the real (simulated) plug; a report after a power change (its latency is
recorded, not asserted); a module registered later appearing; a hub restart and a SIGKILL of the Matter
process, both without re-commissioning; the commissioning window refusing and then admitting a second
controller at the same address with the same passcode; and removing that fabric again.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from devices.model import DeviceKind
from devices.sim.base import StaticModule
from hub.config import MatterConfig
from tests.hub.conftest import Hub, ModuleFactory, make_module
from tests.hub.test_api import register, until
from tests.matter_bridge.conftest import MatterHub
from tests.matter_bridge.e2e.conftest import MatterLab
from tests.matter_bridge.e2e.controller import (
    BRIDGED_BASIC_INFORMATION,
    DESCRIPTOR,
    ELECTRICAL_POWER_MEASUREMENT,
    ON_OFF,
    POWER_SOURCE,
    CommandFailed,
    ControllerClient,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# Device types (Matter 1.3)
ROOT_NODE, AGGREGATOR, BRIDGED_NODE = 0x0016, 0x000E, 0x0013
SOLAR_POWER, BATTERY_STORAGE, POWER_SOURCE_DT = 0x0017, 0x0018, 0x0011
ELECTRICAL_SENSOR, ON_OFF_PLUG = 0x0510, 0x010A

WAIT_S = 30.0  # deadline for things that take a report interval or two
RESTART_WAIT_S = 60.0  # deadline for a controller to come back after a restart


# ------------------------------------------------------------------------------------------ the hub


@pytest.fixture
async def hubs(data_dir: Path, matter_lab: MatterLab) -> AsyncIterator[MatterHub]:
    """The hub, its bridge started in namespace A (``ip netns exec``), advertising on A's veth only."""
    netns = matter_lab.netns
    config = MatterConfig(enabled=True, launcher=netns.exec_prefix(netns.a), interface=netns.if_a, ipv4=False)
    runner = MatterHub(data_dir, config)
    try:
        yield runner
    finally:
        await runner.stop()


async def matter_state(hub: Hub) -> dict[str, Any]:
    status, body = await hub.request("GET", "/matter")
    assert status == 200, body
    return dict(body)


async def wait_matter(hub: Hub, what: str, timeout: float = WAIT_S, **expect: Any) -> dict[str, Any]:
    """Poll ``GET /matter`` until every ``expect`` item matches."""

    async def check() -> dict[str, Any] | None:
        body = await matter_state(hub)
        return body if all(body.get(k) == v for k, v in expect.items()) else None

    return dict(await until(check, timeout, what))


# ------------------------------------------------------------------------------------------ helpers


@dataclass
class Bridged:
    """A simulated module, its device id and its Matter endpoint number."""

    module: StaticModule
    device_id: str
    endpoint: int = -1


def device_types(client: ControllerClient, node_id: int, endpoint: int) -> set[int]:
    raw = client.attribute(node_id, f"{endpoint}/{DESCRIPTOR}/0") or []
    return {int(d["0"]) for d in raw}


async def rest_telemetry(hub: Hub, device_id: str) -> dict[str, Any]:
    status, body = await hub.request("GET", "/device/register")
    assert status == 200, body
    device = next(d for d in body["devices"] if d["device_id"] == device_id)
    assert device["telemetry"] is not None, device
    return dict(device["telemetry"])


def set_power(module: StaticModule, power_w: float) -> None:
    module.sample = replace(module.sample, power_w=power_w)


async def report_latency(
    client: ControllerClient, node_id: int, item: Bridged, power_w: float, timeout: float = WAIT_S
) -> float:
    """Change a solar module's power after a quiet second; seconds until the controller's report of it."""
    path = f"{item.endpoint}/{ELECTRICAL_POWER_MEASUREMENT}/8"
    await client.wait_quiet(1.1, WAIT_S)
    since = client.mark()
    t0 = time.monotonic()
    set_power(item.module, power_w)
    event = await client.wait_attribute(node_id, path, lambda v: v == round(-power_w * 1000), timeout, since)
    return event.t - t0


async def switch(client: ControllerClient, node_id: int, plug: Bridged, on: bool) -> None:
    """Command the plug through Matter; wait until the simulated module itself switched and the
    controller got the report of the new OnOff value."""
    word = "on" if on else "off"
    await client.device_command(node_id, plug.endpoint, ON_OFF, word.capitalize())
    await until(lambda: plug.module.sample.on is on, WAIT_S, f"the plug switched {word}")
    path = f"{plug.endpoint}/{ON_OFF}/0"
    await client.wait_until(lambda: client.attribute(node_id, path) is on, WAIT_S, f"OnOff {word} reported")


# ------------------------------------------------------------------------------------------ the scenario


async def test_a_real_controller_commissions_reads_commands_and_survives_restarts(  # noqa: PLR0917
    hubs: MatterHub,
    matter_lab: MatterLab,
    ores_module: ModuleFactory,
    controller: ControllerClient,
    second_controller: ControllerClient,
    record_property: Any,
) -> None:
    measured: dict[str, Any] = {}

    def note(name: str, value: Any) -> None:
        """Keep a figure: in the JUnit XML (``record_property``) and printed at the end (``-rP``)."""
        measured[name] = value
        record_property(name, value)

    hub = await hubs.start()
    modules = {
        "solar": make_module(DeviceKind.MICROINVERTER, "MI-0001", power_w=321.5),
        "battery": make_module(DeviceKind.ENERGYSTORAGE, "BAT-0001", power_w=-500.0, soc_pct=61.5),
        "meter": make_module(DeviceKind.METER, "MTR-0001", power_w=432.0),
        "plug": make_module(DeviceKind.SMARTPLUG, "PLUG-0001", power_w=-60.0, on=True),
    }
    items: dict[str, Bridged] = {}
    for name, module in modules.items():
        server = await ores_module(module)
        status, body = await register(hub, str(server.address))
        assert status == 201, body
        items[name] = Bridged(module, body["device_id"])

    # --- the bridge runs, every module is bridged, the window is open: commission with the manual code
    state = await wait_matter(
        hub, "the bridge running with its window open", state="running", window_open=True
    )
    assert state["manual_code"] and state["qr_payload"].startswith("MT:")

    async def all_bridged() -> dict[str, int] | None:
        devices = (await matter_state(hub))["devices"]
        numbers = {d["device_id"]: d["endpoint"] for d in devices}
        wanted = {i.device_id for i in items.values()}
        return numbers if wanted <= set(numbers) and all(numbers[d] for d in wanted) else None

    numbers = await until(all_bridged, WAIT_S, "all four modules bridged")
    for item in items.values():
        item.endpoint = numbers[item.device_id]

    async def all_sampled() -> bool:  # values known before commissioning: the interview then has them all
        return all([await _telemetry(hub, i.device_id) for i in items.values()])

    await until(all_sampled, WAIT_S, "first samples")

    t0 = time.monotonic()
    node = await controller.commission_with_code(state["manual_code"])
    note("commissioning_s", round(time.monotonic() - t0, 3))
    node_id = int(node["node_id"])
    assert (await controller.get_node(node_id))["is_bridge"] is True
    await wait_matter(hub, "commissioned", commissioned=True)

    # --- layout: root node, aggregator with its parts list, one bridged endpoint per module
    assert ROOT_NODE in device_types(controller, node_id, 0)
    assert device_types(controller, node_id, 1) == {AGGREGATOR}
    parts = set(controller.attribute(node_id, f"1/{DESCRIPTOR}/3") or [])
    assert parts == {i.endpoint for i in items.values()}
    expected_types = {
        "solar": {SOLAR_POWER, POWER_SOURCE_DT, ELECTRICAL_SENSOR, BRIDGED_NODE},
        "battery": {BATTERY_STORAGE, POWER_SOURCE_DT, ELECTRICAL_SENSOR, BRIDGED_NODE},
        "meter": {ELECTRICAL_SENSOR, BRIDGED_NODE},
        "plug": {ON_OFF_PLUG, BRIDGED_NODE},
    }
    for name, item in items.items():
        types = device_types(controller, node_id, item.endpoint)
        assert expected_types[name] <= types, (name, types)
        serial = controller.attribute(node_id, f"{item.endpoint}/{BRIDGED_BASIC_INFORMATION}/15")
        assert serial == item.module.info.identity.serial
        assert controller.attribute(node_id, f"{item.endpoint}/{BRIDGED_BASIC_INFORMATION}/17") is True

    # --- values equal the hub's REST values (Matter units and signs: docs/matter.md)
    battery, solar, meter, plug = (items[k] for k in ("battery", "solar", "meter", "plug"))
    bat_rest = await rest_telemetry(hub, battery.device_id)
    bat_path = f"{battery.endpoint}/{POWER_SOURCE}/12"
    assert (await controller.read_attribute(node_id, bat_path))[bat_path] == round(bat_rest["soc_pct"] * 2)
    for item, sign in ((solar, -1), (meter, 1), (battery, -1), (plug, -1)):
        rest = await rest_telemetry(hub, item.device_id)
        path = f"{item.endpoint}/{ELECTRICAL_POWER_MEASUREMENT}/8"
        read = (await controller.read_attribute(node_id, path))[path]
        assert read == round(sign * rest["power_w"] * 1000), (item.device_id, read, rest)
    assert (await controller.read_attribute(node_id, f"{plug.endpoint}/{ON_OFF}/0")) == {
        f"{plug.endpoint}/{ON_OFF}/0": True
    }

    # --- On/Off from the controller switches the real plug; the hub's REST shows it
    await switch(controller, node_id, plug, on=False)
    await until(lambda: _plug_is(hub, plug, on=False), WAIT_S, "REST shows the plug off")

    # --- a subscription sees a power change (isolated change: latency recorded, the issue wants < 1 s)
    latencies = [await report_latency(controller, node_id, solar, p) for p in (350.0, 375.5, 290.0)]
    note("report_latency_ms", [round(x * 1000) for x in latencies])

    # --- a module registered after commissioning appears on the node
    since = controller.mark()
    late = make_module(DeviceKind.MICROINVERTER, "MI-LATE")
    server = await ores_module(late)
    status, body = await register(hub, str(server.address))
    assert status == 201, body
    late_item = Bridged(late, body["device_id"])
    numbers = await until(lambda: _endpoint_of(hub, late_item.device_id), WAIT_S, "the late module bridged")
    late_item.endpoint = numbers
    await controller.wait_event(
        lambda e: e.name == "endpoint_added" and e.data == {"node_id": node_id, "endpoint_id": numbers},
        WAIT_S,
        since,
        "endpoint_added",
    )
    await controller.get_node(node_id)
    assert SOLAR_POWER in device_types(controller, node_id, late_item.endpoint)

    # --- restart the hub on the same data directory: the controller comes back without re-commissioning
    t_stop = time.monotonic()
    await hubs.stop()
    hub = await hubs.start()
    await wait_matter(hub, "the bridge running again", state="running", commissioned=True)
    await back_again(controller, node_id, solar, 333.0, RESTART_WAIT_S)
    note("hub_restart_to_report_s", round(time.monotonic() - t_stop, 2))
    await switch(controller, node_id, plug, on=True)

    # --- SIGKILL the Matter process: the hub keeps serving, restarts it, the controller reconnects
    before = await matter_state(hub)
    assert before["pid"]
    t_kill = time.monotonic()
    os.kill(before["pid"], signal.SIGKILL)
    status, _ = await hub.request("GET", "/device/register")
    assert status == 200
    after = await until(
        lambda: _restarted(hub, before["pid"], before["restarts"]), RESTART_WAIT_S, "the bridge restarted"
    )
    assert after["commissioned"] is True
    await back_again(controller, node_id, solar, 344.0, RESTART_WAIT_S)
    note("sigkill_to_report_s", round(time.monotonic() - t_kill, 2))
    await switch(controller, node_id, plug, on=False)

    # --- window closed: a second controller is refused; opened: the same request joins a second fabric
    status, body = await hub.request("DELETE", "/matter/window")
    assert status == 200, body
    assert body["window_open"] is False
    passcode, address = body["passcode"], matter_lab.netns.addr_a
    with pytest.raises(CommandFailed):
        await second_controller.commission_on_network(passcode, address)
    status, body = await hub.request("POST", "/matter/window", json_body={"timeout_s": 120})
    assert status == 200, body
    assert body["window_open"] is True
    node2 = await second_controller.commission_on_network(passcode, address)
    await wait_matter(hub, "the window closed after commissioning", window_open=False)
    fabrics = await until(lambda: _fabrics(hub, 2), WAIT_S, "two fabrics listed")
    assert len(await controller.get_matter_fabrics(node_id)) == 2
    second = next(f for f in fabrics if f["fabric_id"] == "2")
    plug_path = f"{plug.endpoint}/{ON_OFF}/0"
    assert await second_controller.read_attribute(int(node2["node_id"]), plug_path) == {plug_path: False}

    # --- remove the second fabric from the hub; the first controller still works
    status, body = await hub.request("DELETE", f"/matter/fabrics/{second['fabric_index']}")
    assert status == 200, body
    assert [f["fabric_id"] for f in body["fabrics"]] == ["1"]
    status, body = await hub.request("DELETE", f"/matter/fabrics/{second['fabric_index']}")
    assert status == 404, body
    assert [f["fabric_id"] for f in await controller.get_matter_fabrics(node_id)] == [1]
    await switch(controller, node_id, plug, on=True)
    await report_latency(controller, node_id, solar, 300.0)
    print("Matter end-to-end figures:", json.dumps(measured))


async def test_a_hub_removed_from_its_last_controller_can_be_commissioned_again(
    hubs: MatterHub, matter_lab: MatterLab, ores_module: ModuleFactory, controller: ControllerClient
) -> None:
    """The user removes the hub from their smart home app (the controller's RemoveFabric): the bridge is
    uncommissioned, its window stays closed until asked for, and then it can be commissioned again, with its
    modules."""
    hub = await hubs.start()
    server = await ores_module(make_module(DeviceKind.SMARTPLUG, "PLUG-LAST", power_w=-25.0, on=True))
    status, body = await register(hub, str(server.address))
    assert status == 201, body
    state = await wait_matter(hub, "the window open", state="running", window_open=True)
    node = await controller.commission_with_code(state["manual_code"])
    node_id = int(node["node_id"])
    await wait_matter(hub, "commissioned", commissioned=True, window_open=False)
    await controller.remove_node(node_id)  # RemoveFabric on the hub, then forgotten by the controller
    state = await wait_matter(hub, "decommissioned", commissioned=False, fabrics=[], window_open=False)
    status, body = await hub.request("POST", "/matter/window", json_body={"timeout_s": 120})
    assert status == 200 and body["window_open"] is True, body
    again = await controller.commission_on_network(state["passcode"], matter_lab.netns.addr_a)
    again_id = int(again["node_id"])
    await wait_matter(hub, "commissioned again", commissioned=True)
    types = {t for ep in range(2, 10) for t in device_types(controller, again_id, ep)}
    assert 0x010A in types, again  # the plug is bridged on the new fabric


# ------------------------------------------------------------------------------------------ small waits


async def _telemetry(hub: Hub, device_id: str) -> dict[str, Any] | None:
    status, body = await hub.request("GET", "/device/register")
    assert status == 200, body
    device = next((d for d in body["devices"] if d["device_id"] == device_id), None)
    return None if device is None else device["telemetry"]


async def _plug_is(hub: Hub, plug: Bridged, *, on: bool) -> bool:
    telemetry = await _telemetry(hub, plug.device_id)
    return telemetry is not None and telemetry.get("on") is on


async def _endpoint_of(hub: Hub, device_id: str) -> int | None:
    devices = (await matter_state(hub))["devices"]
    return next((d["endpoint"] for d in devices if d["device_id"] == device_id and d["endpoint"]), None)


async def _restarted(hub: Hub, old_pid: int, old_restarts: int) -> dict[str, Any] | None:
    body = await matter_state(hub)
    fresh = body["state"] == "running" and body["pid"] not in (None, old_pid)
    return body if fresh and body["restarts"] > old_restarts else None


async def _fabrics(hub: Hub, count: int) -> list[dict[str, Any]] | None:
    status, body = await hub.request("GET", "/matter/fabrics")
    assert status == 200, body
    fabrics: list[dict[str, Any]] = body["fabrics"]
    return fabrics if len(fabrics) == count else None


async def back_again(
    client: ControllerClient, node_id: int, solar: Bridged, power_w: float, timeout: float
) -> None:
    """After a restart: a new value is reported, and the controller holds the node available."""
    path = f"{solar.endpoint}/{ELECTRICAL_POWER_MEASUREMENT}/8"
    since = client.mark()
    set_power(solar.module, power_w)
    await client.wait_attribute(node_id, path, lambda v: v == round(-power_w * 1000), timeout, since)
    await client.wait_until(lambda: client.available(node_id), timeout, "the node available")
