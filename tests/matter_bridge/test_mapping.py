"""Module → Matter endpoint mapping: kinds, units, signs, clamping and diffs."""

from __future__ import annotations

import math
from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from devices.model import Capabilities, DeviceKind, Identity, Telemetry
from hub.registry import DeviceRecord
from matter_bridge import mapping


def test_kinds() -> None:
    assert mapping.endpoint_kind(DeviceKind.MICROINVERTER) == "solar"
    assert mapping.endpoint_kind(DeviceKind.ENERGYSTORAGE) == "battery"
    assert mapping.endpoint_kind(DeviceKind.METER) == "meter"
    assert mapping.endpoint_kind(DeviceKind.SMARTPLUG) == "plug"
    assert mapping.endpoint_kind(DeviceKind.UNKNOWN) is None


def test_ids_are_stable_safe_and_distinct() -> None:
    a = mapping.endpoint_id("acme.solar_SN-1")
    assert a == mapping.endpoint_id("acme.solar_SN-1")
    assert a != mapping.endpoint_id("acme-solar_SN-1")
    assert len(a) <= 64 and a.replace("_", "").replace("-", "").isalnum()
    u = mapping.unique_id("hub-0123456789abcdef", "acme_SN1")
    assert len(u) == 32
    assert u != mapping.unique_id("hub-fedcba9876543210", "acme_SN1")


def test_solar_production_is_negative_active_power_in_mw() -> None:
    tel = Telemetry(ts=1, power_w=312.4, voltage_v=240.1, current_a=1.3, energy_out_wh=1500.5)
    v = mapping.endpoint_values(DeviceKind.MICROINVERTER, tel, online=True)
    assert v["electricalPowerMeasurement"] == {
        "activePower": -312400,
        "voltage": 240100,
        "activeCurrent": -1300,
    }
    assert v["electricalEnergyMeasurement"] == {
        "cumulativeEnergyImported": None,
        "cumulativeEnergyExported": {"energy": 1500500},
    }
    assert v["bridgedDeviceBasicInformation"] == {"reachable": True}


def test_battery_soc_half_percent_and_charge_state() -> None:
    charging = mapping.endpoint_values(
        DeviceKind.ENERGYSTORAGE, Telemetry(ts=1, power_w=-800, soc_pct=72.3), online=True
    )
    assert charging["powerSource"] == {"batPercentRemaining": 145, "batChargeState": 1}
    assert charging["electricalPowerMeasurement"]["activePower"] == 800_000  # charging imports
    full = mapping.endpoint_values(
        DeviceKind.ENERGYSTORAGE, Telemetry(ts=1, power_w=0, soc_pct=100), online=True
    )
    assert full["powerSource"] == {"batPercentRemaining": 200, "batChargeState": 2}
    discharging = mapping.endpoint_values(
        DeviceKind.ENERGYSTORAGE, Telemetry(ts=1, power_w=1200, soc_pct=50), online=True
    )
    assert discharging["powerSource"]["batChargeState"] == 3
    assert discharging["electricalPowerMeasurement"]["activePower"] == -1_200_000


def test_meter_keeps_the_hub_sign_and_swaps_energy_direction() -> None:
    v = mapping.endpoint_values(
        DeviceKind.METER, Telemetry(ts=1, power_w=-950, energy_out_wh=10, energy_in_wh=20), online=False
    )
    assert v["electricalPowerMeasurement"]["activePower"] == -950_000  # exporting
    assert v["electricalEnergyMeasurement"] == {
        "cumulativeEnergyImported": {"energy": 10_000},
        "cumulativeEnergyExported": {"energy": 20_000},
    }
    assert v["bridgedDeviceBasicInformation"] == {"reachable": False}


def test_plug_relay_and_draw() -> None:
    v = mapping.endpoint_values(DeviceKind.SMARTPLUG, Telemetry(ts=1, power_w=-60, on=True), online=True)
    assert v["onOff"] == {"onOff": True}
    assert v["electricalPowerMeasurement"]["activePower"] == 60_000
    no_relay = mapping.endpoint_values(DeviceKind.SMARTPLUG, Telemetry(ts=1), online=True)
    assert "onOff" not in no_relay


def test_no_sample_yet_gives_nulls() -> None:
    v = mapping.endpoint_values(DeviceKind.ENERGYSTORAGE, None, online=False)
    assert v["electricalPowerMeasurement"] == {"activePower": None, "voltage": None, "activeCurrent": None}
    assert v["powerSource"]["batPercentRemaining"] is None


@given(
    power=st.floats(allow_nan=True, allow_infinity=True),
    soc=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
    kind=st.sampled_from(
        [DeviceKind.MICROINVERTER, DeviceKind.ENERGYSTORAGE, DeviceKind.METER, DeviceKind.SMARTPLUG]
    ),
)
def test_values_always_fit_what_the_bridge_declares(
    power: float, soc: float | None, kind: DeviceKind
) -> None:
    v = mapping.endpoint_values(kind, Telemetry(ts=1, power_w=power, soc_pct=soc), online=True)
    ap = v["electricalPowerMeasurement"]["activePower"]
    assert ap is None or (isinstance(ap, int) and abs(ap) <= mapping.MAX_MW)
    assert (ap is None) == math.isnan(power)
    if kind is DeviceKind.ENERGYSTORAGE:
        pct = v["powerSource"]["batPercentRemaining"]
        assert pct is None or 0 <= pct <= 200


def test_diff_carries_only_changes() -> None:
    old = {"a": {"x": 1, "y": 2}, "b": {"z": None}}
    new = {"a": {"x": 1, "y": 3}, "b": {"z": None}, "c": {"w": True}}
    assert mapping.diff_values(old, new) == {"a": {"y": 3}, "c": {"w": True}}
    assert mapping.diff_values(new, new) == {}


def test_info_uses_the_users_name_and_a_unique_id() -> None:
    rec = DeviceRecord(
        device_id="acme_SN1",
        kind=DeviceKind.SMARTPLUG,
        identity=Identity("Acme", "Plug 2", "SN1", "1.2.3"),
        capabilities=Capabilities(),
        address="ores-http://127.0.0.1:1",
        protocol="ores-http",
        name="Fridge",
    )
    info = mapping.endpoint_info(rec, "hub-0123456789abcdef", reachable=True)
    assert info["name"] == "Fridge" and info["serial"] == "SN1" and info["product"] == "Plug 2"
    assert info["uniqueId"] != info["serial"] and info["softwareVersion"] == "1.2.3"
    unnamed = mapping.endpoint_info(replace(rec, name=""), "h", reachable=False)
    assert unnamed["name"] == "Acme Plug 2" and unnamed["reachable"] is False
