"""A BLE-only module onboarded through the hub: a real bleak advertisement into the scanner's callback, the
hub's onboarding, and the GATT driver over the documented characteristics.  There is no radio here, so the
GATT client is the fake that ships beside the driver (``devices.drivers.ble_fake``)."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from devices.attest import make_sim_attestation
from devices.drivers.base import Address, replace_driver
from devices.drivers.ble import BleGattDriver
from devices.drivers.ble_fake import FakeGattModule
from devices.model import Capabilities, DeviceInfo, DeviceKind, Identity, Telemetry
from devices.sim.base import StaticModule
from discovery.ble import BleScanner
from hub.onboarding import CandidateStatus
from tests.hub.conftest import Hub
from tests.hub.test_api import until

VENDOR = "ORES Demo Vendors"  # vendor id 0xFFFF in the BLE advertisement registry


@pytest.fixture
def radio() -> Iterator[dict[str, FakeGattModule]]:
    """The modules in radio range; the BLE driver plugin reaches them through the fake GATT client."""
    in_range: dict[str, FakeGattModule] = {}

    class RadioDriver(BleGattDriver):
        def __init__(self, address: Address, *, timeout: float = 5.0, **kw: Any) -> None:
            super().__init__(
                address, timeout=timeout, client_factory=in_range[address.host].client_factory, **kw
            )

    previous = replace_driver(RadioDriver)
    try:
        yield in_range
    finally:
        assert previous is not None
        replace_driver(previous)


async def test_ble_only_module_is_discovered_authenticated_and_polled(
    hub: Hub, radio: dict[str, FakeGattModule]
) -> None:
    vendor_key = Ed25519PrivateKey.generate()
    raw = vendor_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    status, _ = await hub.request(
        "POST", "/hub/trust", json_body={"vendor": VENDOR, "public_key": base64.b64encode(raw).decode()}
    )
    assert status == 201
    info = DeviceInfo(
        DeviceKind.SMARTPLUG,
        Identity(VENDOR, "BLE-PLUG", "BP0001", "1.0.0"),
        Capabilities(rated_power_w=1000),
    )
    module = StaticModule(info, Telemetry(ts=0.0, power_w=-42.0, on=True))
    fake = FakeGattModule(
        module, attestation=make_sim_attestation(vendor_key, vendor=VENDOR, model="BLE-PLUG", serial="BP0001")
    )
    radio[fake.address] = fake

    scanner = BleScanner(hub.ctx.onboarding)
    device, adv = fake.advertisement()
    scanner._on_advertisement(device, adv)  # the callback BleakScanner calls
    cand = await hub.ctx.onboarding.wait_examined(info.device_id)
    assert cand.status is CandidateStatus.VERIFIED, cand.reason
    status, body = await hub.request("POST", "/device/register", json_body={"candidate_id": info.device_id})
    assert status == 201, body
    assert body["protocol"] == "ble-gatt" and body["authenticated"] is True
    assert body["address"] == f"ble://{fake.address}"
    assert fake.provisioned
    live = hub.ctx.state.devices[info.device_id]
    await until(lambda: live.online and live.telemetry is not None, what="polled over GATT")
    assert live.telemetry is not None and live.telemetry.power_w == -42.0
    status, res = await hub.request(
        "POST", "/smartplug/control", json_body={"device_id": info.device_id, "on": False}
    )
    assert status == 200, res
    assert module.sample.on is False
