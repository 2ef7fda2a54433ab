"""The REST API against a real hub on a loopback port with real ORES-HTTP modules."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from devices.model import DeviceKind, Setpoint
from tests.hub.conftest import Hub, ModuleFactory, make_module


async def until(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``cond`` until it is truthy (a deadline, not a sleep used as synchronisation)."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def assert_error(body: Any, code: str) -> None:
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "details"}, body
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]


async def register(hub: Hub, address: str, **extra: Any) -> tuple[int, Any]:
    return await hub.request("POST", "/device/register", json_body={"address": address, **extra})


# --------------------------------------------------------------------------------------------- auth


async def test_reads_need_a_token_and_writes_need_the_role(hub: Hub) -> None:
    status, body = await hub.request("GET", "/app/monitor", token="")
    assert status == 401
    assert_error(body, "unauthenticated")
    status, body = await hub.request("GET", "/app/monitor", token="not-a-token")
    assert status == 401
    viewer = await hub.token_for("viewer")
    status, body = await hub.request("GET", "/app/monitor", token=viewer)
    assert status == 200
    assert body["site"]["pv_w"] == 0
    status, body = await hub.request(
        "POST", "/microinverter/control", token=viewer, json_body={"power_limit_pct": 50}
    )
    assert status == 403
    assert_error(body, "forbidden")
    homeowner = await hub.token_for("homeowner")
    status, body = await hub.request("PATCH", "/hub/configure", token=homeowner, json_body={"site_name": "x"})
    assert status == 403
    status, body = await hub.request("PATCH", "/hub/configure", json_body={"site_name": "Casa"})
    assert status == 200, body
    assert body["settings"]["site_name"] == "Casa"


async def test_pairing_is_rate_limited(hub: Hub) -> None:
    for _ in range(5):
        status, body = await hub.request(
            "POST", "/auth/pair", token="", json_body={"code": "0000-0000", "name": "x"}
        )
        assert status == 401
        assert_error(body, "invalid_pairing_code")
    status, body = await hub.request(
        "POST", "/auth/pair", token="", json_body={"code": "0000-0000", "name": "x"}
    )
    assert status == 429
    assert_error(body, "rate_limited")
    # A valid code is refused too while this client is locked out: the limit is checked first.
    _, code = await hub.request("POST", "/auth/pairing-code", json_body={"role": "viewer"})
    status, body = await hub.request(
        "POST", "/auth/pair", token="", json_body={"code": code["code"], "name": "x"}
    )
    assert status == 429
    _, tokens = await hub.request("GET", "/auth/tokens")
    assert [t["role"] for t in tokens["tokens"]] == ["installer"]


async def test_tokens_are_listed_and_revocation_is_immediate(hub: Hub) -> None:
    viewer = await hub.token_for("viewer")
    _, tokens = await hub.request("GET", "/auth/tokens")
    assert sorted(t["role"] for t in tokens["tokens"]) == ["installer", "viewer"]
    assert all("token" not in t for t in tokens["tokens"])
    viewer_id = next(t["token_id"] for t in tokens["tokens"] if t["role"] == "viewer")
    assert (await hub.request("GET", "/app/monitor", token=viewer))[0] == 200
    status, _ = await hub.request("DELETE", f"/auth/tokens/{viewer_id}")
    assert status == 200
    status, body = await hub.request("GET", "/app/monitor", token=viewer)
    assert status == 401
    status, body = await hub.request("DELETE", "/auth/tokens/nope")
    assert status == 404
    installer_id = next(t["token_id"] for t in tokens["tokens"] if t["role"] == "installer")
    status, body = await hub.request("DELETE", f"/auth/tokens/{installer_id}")
    assert status == 409
    assert_error(body, "last_installer")


# --------------------------------------------------------------------------------------------- validation


async def test_bad_input_gets_the_error_format(hub: Hub) -> None:
    url = hub.url("/microinverter/control")
    async with hub.session.post(
        url, data=b"{not json", headers={**hub.headers(), "Content-Type": "application/json"}
    ) as r:
        assert r.status == 400
        assert_error(await r.json(), "invalid_json")
    async with hub.session.post(
        url, data=b"NaN", headers={**hub.headers(), "Content-Type": "application/json"}
    ) as r:
        assert r.status == 400
    async with hub.session.post(
        url, data=b"x" * 70_000, headers={**hub.headers(), "Content-Type": "application/json"}
    ) as r:
        assert r.status == 413
        assert_error(await r.json(), "payload_too_large")
    status, body = await hub.request("POST", "/microinverter/control", json_body={"power_limit_pct": 150})
    assert status == 422
    assert_error(body, "invalid_body")
    assert body["error"]["details"][0]["loc"] == ["power_limit_pct"]
    status, body = await hub.request(
        "POST", "/microinverter/control", json_body={"power_limit_pct": 5, "extra": 1}
    )
    assert status == 422
    status, body = await hub.request("GET", "/device/data/logging")
    assert status == 400
    assert_error(body, "invalid_query")
    status, body = await hub.request("GET", "/no/such/path")
    assert status == 404
    assert_error(body, "not_found")
    status, body = await hub.request("PUT", "/microinverter/status")
    assert status == 405
    assert_error(body, "method_not_allowed")
    status, body = await register(hub, "ftp://127.0.0.1:1")
    assert status == 422
    assert_error(body, "invalid_address")
    status, body = await register(hub, "http://203.0.113.7:80/ores/v1")
    assert status == 403
    assert_error(body, "address_not_allowed")


async def test_openapi_describes_every_route(hub: Hub) -> None:
    status, doc = await hub.request("GET", "/openapi.json", token="")
    assert status == 200
    assert doc["openapi"] == "3.1.0"
    for path in (
        "/microinverter/status",
        "/microinverter/energy",
        "/microinverter/control",
        "/energystorage/status",
        "/energystorage/storage",
        "/energystorage/control",
        "/device/register",
        "/device/data/logging",
        "/device/diagnostics/remote",
        "/device/safety/fault-detection",
        "/hub/configure",
        "/hub/communicate",
        "/app/monitor",
        "/app/notify",
        "/app/settings",
    ):
        assert path in doc["paths"], path
    body_schema = doc["paths"]["/microinverter/control"]["post"]["requestBody"]["content"]["application/json"]
    ref = body_schema["schema"]["$ref"].rsplit("/", 1)[1]
    limit = doc["components"]["schemas"][ref]["properties"]["power_limit_pct"]
    assert (limit["minimum"], limit["maximum"]) == (0, 100)


# --------------------------------------------------------------------------------------------- devices


async def test_register_poll_and_history(hub: Hub, ores_module: ModuleFactory) -> None:
    module = make_module(DeviceKind.MICROINVERTER, "INV1")
    server = await ores_module(module)
    status, body = await register(hub, str(server.address), name="Roof west")
    assert status == 201, body
    device_id = body["device_id"]
    assert body["kind"] == "microinverter"
    assert body["protocol"] == "ores-http"
    assert body["name"] == "Roof west"
    # Registering again is idempotent.
    status, again = await register(hub, str(server.address))
    assert status == 200
    assert again["device_id"] == device_id
    assert again["name"] == "Roof west"

    async def online() -> Any:
        _status, body = await hub.request("GET", "/microinverter/status")
        return body if body["online"] == 1 else None

    status_body = await until(online, what="inverter online")
    assert status_body["total_power_w"] == 300.0
    monitor = (await hub.request("GET", "/app/monitor"))[1]
    assert monitor["site"]["pv_w"] == 300.0
    await until(lambda: hub.ctx.state.devices[device_id].stats.polls >= 3, what="three polls")
    await hub.ctx.history.flush()
    status, log = await hub.request(
        "GET", "/device/data/logging", params={"device_id": device_id, "resolution": "raw"}
    )
    assert status == 200, log
    assert len(log["points"]) >= 3
    assert all(p["power_w"] == 300.0 for p in log["points"])
    status, diag = await hub.request(
        "POST", "/device/diagnostics/remote", json_body={"device_id": device_id, "action": "probe"}
    )
    assert status == 200
    assert diag["ok"] and diag["identity"]["serial"] == "INV1"


async def test_same_module_at_new_address_is_updated_not_duplicated(
    hub: Hub, ores_module: ModuleFactory
) -> None:
    module = make_module(DeviceKind.SMARTPLUG, "PLUG1")
    first = await ores_module(module)
    status, body = await register(hub, str(first.address))
    assert status == 201
    await first.stop()
    second = await ores_module(module)
    status, body = await register(hub, str(second.address))
    assert status == 200
    assert body["address"] == str(second.address)
    status, listing = await hub.request("GET", "/device/register")
    assert [d["device_id"] for d in listing["devices"]] == [body["device_id"]]


async def test_other_identity_at_known_address_is_refused_with_an_alert(
    hub: Hub, ores_module: ModuleFactory
) -> None:
    first = await ores_module(make_module(DeviceKind.SMARTPLUG, "PLUG1"))
    status, body = await register(hub, str(first.address))
    assert status == 201
    port = first.address.port
    await first.stop()
    await ores_module(make_module(DeviceKind.SMARTPLUG, "INTRUDER"), port=port)
    status, body = await register(hub, str(first.address))
    assert status == 409
    assert_error(body, "address_in_use")
    status, faults = await hub.request("GET", "/device/safety/fault-detection")
    assert any(a["kind"] == "identity_mismatch" for a in faults["alerts"])


async def test_offline_detection_and_recovery(hub: Hub, ores_module: ModuleFactory) -> None:
    module = make_module(DeviceKind.METER, "M1")
    server = await ores_module(module)
    _, body = await register(hub, str(server.address))
    device_id = body["device_id"]
    await until(lambda: hub.ctx.state.devices[device_id].online, what="online")
    port = server.address.port
    await server.stop()
    await until(lambda: not hub.ctx.state.devices[device_id].online, what="offline")

    async def offline_alert() -> bool:
        _, faults = await hub.request("GET", "/device/safety/fault-detection", params={"active_only": "true"})
        return any(a["kind"] == "device_offline" and a["device_id"] == device_id for a in faults["alerts"])

    await until(offline_alert, what="offline alert")
    _status, links = await hub.request("GET", "/hub/communicate")
    link = links["links"][0]
    assert link["online"] is False and link["consecutive_failures"] >= 2 and link["last_error"]
    await ores_module(module, port=port)
    await until(lambda: hub.ctx.state.devices[device_id].online, timeout=20, what="back online")


async def test_a_dead_module_does_not_delay_the_others(hub: Hub, ores_module: ModuleFactory) -> None:
    alive = await ores_module(make_module(DeviceKind.MICROINVERTER, "ALIVE"))
    dead = await ores_module(make_module(DeviceKind.MICROINVERTER, "DEAD"))
    _, a = await register(hub, str(alive.address))
    _, d = await register(hub, str(dead.address))
    await dead.stop()
    start = hub.ctx.state.devices[a["device_id"]].stats.polls
    await until(lambda: not hub.ctx.state.devices[d["device_id"]].online, what="dead offline")
    # While the dead one times out and backs off, the live one keeps being polled.
    await until(lambda: hub.ctx.state.devices[a["device_id"]].stats.polls >= start + 5, what="live polls")
    assert hub.ctx.state.devices[a["device_id"]].online


# --------------------------------------------------------------------------------------------- control


async def test_control_ttl_returns_module_to_default(hub: Hub, ores_module: ModuleFactory) -> None:
    module = make_module(DeviceKind.MICROINVERTER, "INV9")
    server = await ores_module(module)
    _, body = await register(hub, str(server.address))
    device_id = body["device_id"]
    await until(lambda: hub.ctx.state.devices[device_id].online, what="online")
    status, res = await hub.request(
        "POST",
        "/microinverter/control",
        json_body={"device_id": device_id, "power_limit_pct": 40, "ttl_s": 1.5},
    )
    assert status == 200, res
    result = res["results"][0]
    assert result["status"] == "applied"
    assert result["control"]["source"] == "api"
    assert module.sample.power_limit_pct == 40
    assert module.received[-1][0] == Setpoint(power_limit_pct=40)
    assert module.received[-1][1] is not None  # a module-side watchdog was armed
    status, ctl = await hub.request("GET", "/microinverter/control", params={"device_id": device_id})
    assert ctl["controls"][device_id]["source"] == "api"
    # When the TTL ends, the hub's watchdog sends the module back to its default.
    await until(lambda: module.received[-1][0].release, timeout=15, what="release after ttl")
    assert module.sample.power_limit_pct == 100
    status, ctl = await hub.request("GET", "/microinverter/control", params={"device_id": device_id})
    assert ctl["controls"][device_id]["source"] == "default"


async def test_storage_and_plug_control(hub: Hub, ores_module: ModuleFactory) -> None:
    battery = make_module(DeviceKind.ENERGYSTORAGE, "BAT1")
    plug = make_module(DeviceKind.SMARTPLUG, "PLUG7")
    bs = await ores_module(battery)
    ps = await ores_module(plug)
    _, b = await register(hub, str(bs.address))
    _, p = await register(hub, str(ps.address))
    status, body = await hub.request("POST", "/energystorage/control", json_body={"mode": "charge"})
    assert status == 422
    status, body = await hub.request(
        "POST", "/energystorage/control", json_body={"mode": "charge", "power_w": 9000}
    )
    assert status == 422
    assert_error(body, "out_of_range")
    status, body = await hub.request(
        "POST", "/energystorage/control", json_body={"mode": "charge", "power_w": 1200}
    )
    assert status == 200, body
    assert battery.received[-1][0] == Setpoint(battery_power_w=-1200)
    status, body = await hub.request(
        "POST", "/smartplug/control", json_body={"device_id": p["device_id"], "on": False}
    )
    assert status == 200, body
    assert plug.sample.on is False
    status, body = await hub.request(
        "POST", "/app/monitor", json_body={"device_id": p["device_id"], "power_limit_pct": 3}
    )
    assert status == 422
    status, body = await hub.request("DELETE", "/smartplug/control", params={"device_id": p["device_id"]})
    assert status == 200
    assert body["results"][0]["status"] == "released"
    assert plug.sample.on is True
    status, body = await hub.request("DELETE", f"/device/register/{b['device_id']}")
    assert status == 200
    status, body = await hub.request("GET", "/energystorage/status")
    assert body["devices"] == []


async def test_command_to_unreachable_module_stays_pending(hub: Hub, ores_module: ModuleFactory) -> None:
    module = make_module(DeviceKind.MICROINVERTER, "INV5")
    server = await ores_module(module)
    _, body = await register(hub, str(server.address))
    device_id = body["device_id"]
    port = server.address.port
    await server.stop()
    await until(lambda: not hub.ctx.state.devices[device_id].online, what="offline")
    status, res = await hub.request(
        "POST", "/microinverter/control", json_body={"power_limit_pct": 20, "ttl_s": 600}
    )
    assert status == 200
    assert res["results"][0]["status"] == "pending"
    # When the module returns, the hub writes the pending command.
    await ores_module(module, port=port)
    await until(lambda: module.sample.power_limit_pct == 20, timeout=40, what="pending command written")


# --------------------------------------------------------------------------------------------- push stream


async def test_push_stream_sends_monitor_and_events(hub: Hub, ores_module: ModuleFactory) -> None:
    url = hub.url("/app/monitor/stream")
    async with hub.session.get(url, headers={}) as resp:
        assert resp.status == 401
    async with hub.session.get(url, params={"access_token": hub.token}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        server = await ores_module(make_module(DeviceKind.SMARTPLUG, "P3"))
        await register(hub, str(server.address))
        seen: set[str] = set()
        event = None
        async for raw in resp.content:
            line = raw.decode().strip()
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event:
                seen.add(event)
                json.loads(line[6:])
            if {"monitor", "device.registered", "device.online"} <= seen:
                break
        assert {"monitor", "device.registered", "device.online"} <= seen


async def test_settings_round_trip_and_persist(hub: Hub) -> None:
    status, body = await hub.request(
        "PATCH", "/app/settings", json_body={"low_soc_alert_pct": 25, "currency": "EUR"}
    )
    assert status == 200, body
    assert body["settings"]["low_soc_alert_pct"] == 25
    saved = json.loads((hub.ctx.config.data_dir / "settings.json").read_text())
    assert saved["app"]["currency"] == "EUR"
    status, body = await hub.request("PATCH", "/app/settings", json_body={"currency": "euro"})
    assert status == 422
    status, body = await hub.request("GET", "/app/settings")
    assert body["settings"]["currency"] == "EUR"


async def test_connection_errors_surface_cleanly(hub: Hub) -> None:
    # Nothing listens on this port: registration reports the module as unreachable, not a 500.
    status, body = await register(hub, "http://127.0.0.1:9/ores/v1")
    assert status == 422, body
    assert body["error"]["code"] == "device_unreachable"
