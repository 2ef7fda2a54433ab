"""The hub's pollers against misbehaving SunSpec modules: bad replies become an offline state with a logged
reason, never a crash, and the module recovers when its replies are good again."""

from __future__ import annotations

import logging

import pytest

from tests.devices.drivers.test_sunspec import (  # noqa: F401  (raw is a fixture)
    COMMON,
    INVERTER_103,
    W_SF_ADDRESS,
    RawDevice,
    StartRaw,
    model_regs,
    raw,
    sunspec_map,
)
from tests.hub.conftest import Hub
from tests.hub.test_api import register, until


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("bad_scale_factor", "outside"),
        ("short_reply", "short"),
        ("wrong_marker", "marker"),
    ],
)
async def test_malformed_modbus_replies_make_the_module_offline_with_a_reason(
    hub: Hub,
    raw: StartRaw,  # noqa: F811 (the fixture imported above)
    caplog: pytest.LogCaptureFixture,
    fault: str,
    reason: str,
) -> None:
    pristine = sunspec_map(COMMON, model_regs(103, **INVERTER_103))
    device = RawDevice(list(pristine))
    server = await raw(device)
    status, body = await register(hub, str(server.address))
    assert status == 201, body
    device_id = body["device_id"]
    live = hub.ctx.state.devices[device_id]
    await until(lambda: live.online and live.telemetry is not None, what="online")
    assert live.telemetry is not None and live.telemetry.power_w == 500.0

    with caplog.at_level(logging.INFO):
        if fault == "bad_scale_factor":
            device.overrides[W_SF_ADDRESS] = 11
        elif fault == "short_reply":
            device.short_reads[40000] = 10
            device.short_reads[40002] = 10
            device.overrides[W_SF_ADDRESS] = 11  # the link reconnects and re-probes: make reads fail too
        else:
            # A module whose map is replaced by garbage: the failing read makes the link re-probe, and the
            # probe finds no SunS marker.
            device.overrides[40000] = 0x5375
            device.overrides[40001] = 0x6E00
            device.overrides[W_SF_ADDRESS] = 11
        await until(lambda: not live.online, what="offline")
    live_error = live.stats.last_error
    assert live_error is not None
    assert any(
        record.levelno >= logging.INFO and "failed" in record.getMessage() for record in caplog.records
    )

    # The hub keeps serving, and the reason is visible to the user.
    status, links = await hub.request("GET", "/device/diagnostics/remote", params={"device_id": device_id})
    assert status == 200
    assert links["links"][0]["online"] is False
    assert links["links"][0]["last_error"]
    status, _monitor = await hub.request("GET", "/app/monitor")
    assert status == 200

    assert reason in live_error

    # Good replies again; the link is in backoff, so ask it to reconnect now, as a user would.
    # (The raw server writes overrides into its registers, so put the original values back.)
    device.overrides = {address: pristine[address - 40000] for address in device.overrides}
    device.short_reads.clear()
    status, result = await hub.request(
        "POST", "/device/diagnostics/remote", json_body={"device_id": device_id, "action": "reconnect"}
    )
    assert status == 200 and result["ok"], result
    await until(lambda: live.online, timeout=30, what="back online")
