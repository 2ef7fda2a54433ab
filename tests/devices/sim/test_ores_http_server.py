"""Tests of the simulated ORES-HTTP module server, spoken to with a plain aiohttp client.

They check the server against docs/module-protocol.md itself (not through the hub's driver): the JSON shapes
of the four endpoints, the error body and status for every kind of bad request, the bearer check, the
active setpoint and watchdog in ``/status``, and a clean stop; and the authentication of §6: challenges signed
with the device key, provisioning, the credential required afterwards, refused take-over, re-key and
deprovisioning; and the firmware update of §9 with real signed releases and a manual reboot clock.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from devices.attest import DeviceCertificate, TrustAnchor, key_id, make_sim_attestation, verify_attestation
from devices.drivers.base import Address
from devices.model import (
    Capabilities,
    DeviceInfo,
    DeviceKind,
    Identity,
    OperatingState,
    Setpoint,
    Telemetry,
)
from devices.ores_http_wire import MAX_BODY_BYTES, Fault, generate_credential, parse_ts
from devices.sim.base import SimServer, StaticModule
from devices.sim.firmware import SimFirmware
from devices.sim.ores_http_server import OresHttpSimServer, ReportsFaults, start_ores_http_server
from tests.devices.sim.test_firmware import ManualClock, Signer, image_of
from tests.serving import serving

INVERTER = DeviceInfo(
    DeviceKind.MICROINVERTER,
    Identity("Acme Solar", "MI-400", "MI-0001", "1.2.3"),
    Capabilities(rated_power_w=400.0),
)
BATTERY = DeviceInfo(
    DeviceKind.ENERGYSTORAGE,
    Identity("Acme Storage", "B-5", "B5-0042", "2.1.0"),
    Capabilities(capacity_wh=5000.0, max_charge_w=2000.0, max_discharge_w=2500.0),
)


def inverter(**changes: Any) -> StaticModule:
    return StaticModule(info=INVERTER, sample=Telemetry(ts=0.0, power_w=300.0, energy_out_wh=10.0, **changes))


Serve = Callable[..., Awaitable[OresHttpSimServer]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    async for start in serving(start_ores_http_server):
        yield start


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def url(server: OresHttpSimServer, endpoint: str) -> str:
    return f"{server.address}/{endpoint}"


async def call(
    http: aiohttp.ClientSession,
    method: str,
    target: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, aiohttp.ClientResponse]:
    async with http.request(method, target, data=body, headers=headers) as response:
        raw = await response.read()
        assert response.content_type == "application/json"
        return response.status, json.loads(raw), response


async def post_control(
    http: aiohttp.ClientSession, server: OresHttpSimServer, body: object
) -> tuple[int, Any]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, data, _ = await call(
        http, "POST", url(server, "control"), raw, {"Content-Type": "application/json"}
    )
    return status, data


def assert_error(data: Any, code: str, message_part: str = "") -> None:
    """The documented error body: {"error": {"code", "message", "details"}}."""
    assert set(data) == {"error"}
    error = data["error"]
    assert set(error) == {"code", "message", "details"}
    assert error["code"] == code
    assert isinstance(error["message"], str)
    assert error["message"]
    assert message_part in error["message"]
    assert isinstance(error["details"], dict)


# ----------------------------------------------------------------------------------------- endpoints


async def test_address_and_sim_server_protocol(serve: Serve) -> None:
    module = inverter()
    server: SimServer = await serve(module)
    address = server.address
    assert address.scheme == "http"
    assert address.host == "127.0.0.1"
    assert address.port != 0
    assert address.path == "/ores/v1"
    assert Address.parse(str(address)) == address
    assert server.module is module


async def test_identity_shape(serve: Serve, http: aiohttp.ClientSession) -> None:
    server = await serve(StaticModule(info=BATTERY))
    status, data, _ = await call(http, "GET", url(server, "identity"))
    assert status == 200
    assert data == {
        "protocol": "ores-http",
        "protocol_version": "1.0",
        "kind": "energystorage",
        "vendor": "Acme Storage",
        "model": "B-5",
        "serial": "B5-0042",
        "firmware_version": "2.1.0",
        "capabilities": {
            "rated_power_w": None,
            "capacity_wh": 5000.0,
            "max_charge_w": 2000.0,
            "max_discharge_w": 2500.0,
            "min_soc_pct": None,
            "max_soc_pct": None,
            "controllable": True,
            "priority": None,
            "critical": False,
        },
    }


async def test_telemetry_field_names_are_the_model_s(serve: Serve, http: aiohttp.ClientSession) -> None:
    server = await serve(inverter(state=OperatingState.THROTTLED, power_limit_pct=80.0))
    before = time.time()
    status, data, _ = await call(http, "GET", url(server, "telemetry"))
    after = time.time()
    assert status == 200
    assert set(data) == {f.name for f in dataclasses.fields(Telemetry)}
    assert data["ts"].endswith("Z")
    assert before - 0.001 <= parse_ts(data["ts"], "ts") <= after
    assert data["state"] == "throttled"
    assert data["power_w"] == 300.0
    assert data["power_limit_pct"] == 80.0
    assert data["soc_pct"] is None


async def test_status_reports_setpoint_and_watchdog(serve: Serve, http: aiohttp.ClientSession) -> None:
    server = await serve(inverter())
    status, data, _ = await call(http, "GET", url(server, "status"))
    assert status == 200
    assert data["state"] == "running"
    assert data["uptime_s"] >= 0
    assert data["faults"] == []
    assert data["setpoint"] == {
        "power_limit_pct": None,
        "battery_power_w": None,
        "on": None,
        "revert_at": None,
    }

    before = time.time()
    code, reply = await post_control(http, server, {"power_limit_pct": 40, "revert_after_s": 60})
    after = time.time()
    assert code == 200
    assert reply["power_limit_pct"] == 40.0
    assert before + 60 - 0.001 <= parse_ts(reply["revert_at"], "revert_at") <= after + 60
    _, data, _ = await call(http, "GET", url(server, "status"))
    assert data["setpoint"] == reply

    # a control without revert_after_s cancels the watchdog
    code, reply = await post_control(http, server, {"power_limit_pct": 45})
    assert code == 200
    assert reply == {"power_limit_pct": 45.0, "battery_power_w": None, "on": None, "revert_at": None}


async def test_fault_state_and_fault_codes(serve: Serve, http: aiohttp.ClientSession) -> None:
    server = await serve(inverter(state=OperatingState.FAULT))
    _, data, _ = await call(http, "GET", url(server, "status"))
    assert data["state"] == "fault"
    assert data["faults"] == [{"code": "fault", "message": "the module reports a fault"}]

    class HotInverter(StaticModule):
        def faults(self) -> Sequence[Fault]:
            return [Fault("over_temperature", "heat sink above 85 °C")]

    hot = HotInverter(info=INVERTER, sample=Telemetry(ts=0.0, state=OperatingState.THROTTLED))
    assert isinstance(hot, ReportsFaults)
    server = await serve(hot)
    _, data, _ = await call(http, "GET", url(server, "status"))
    assert data["state"] == "throttled"
    assert data["faults"] == [{"code": "over_temperature", "message": "heat sink above 85 °C"}]


async def test_control_reaches_the_module(serve: Serve, http: aiohttp.ClientSession) -> None:
    module = StaticModule(info=BATTERY)
    server = await serve(module)
    code, reply = await post_control(
        http, server, {"battery_power_w": -800, "revert_after_s": 30, "future": 1}
    )
    assert code == 200  # unknown fields are ignored
    assert reply["battery_power_w"] == -800.0
    assert module.received == [(Setpoint(battery_power_w=-800.0), 30.0)]
    code, reply = await post_control(http, server, {"release": True, "battery_power_w": 5})
    assert code == 200
    assert reply == {"power_limit_pct": None, "battery_power_w": None, "on": None, "revert_at": None}
    assert module.received[-1] == (Setpoint(release=True), None)


# ----------------------------------------------------------------------------------------- bad requests


@pytest.mark.parametrize(
    "case",
    [
        (b"{not json", 400, "bad_request", "body is not JSON"),
        (b"[50]", 400, "bad_request", "expected an object, got array"),
        (b"{}", 400, "bad_request", "no setpoint field"),
        (b'{"revert_after_s": 10}', 400, "bad_request", "no setpoint field"),
        (b'{"release": false}', 400, "bad_request", "no setpoint field"),
        (b'{"power_limit_pct": "50"}', 400, "bad_request", "control.power_limit_pct: expected a number"),
        (b'{"power_limit_pct": true}', 400, "bad_request", "expected a number, got boolean"),
        (b'{"power_limit_pct": NaN}', 400, "bad_request", "NaN"),
        (b'{"power_limit_pct": 1e999}', 400, "bad_request", "must be finite"),
        (b'{"power_limit_pct": 50, "revert_after_s": "soon"}', 400, "bad_request", "revert_after_s"),
        (b'{"release": true, "on": "x"}', 400, "bad_request", "control.on: expected a boolean"),
        (b'{"power_limit_pct": 150}', 422, "out_of_range", "power_limit_pct: 150 is outside 0..100"),
        (b'{"power_limit_pct": -1}', 422, "out_of_range", "outside 0..100"),
        (b'{"power_limit_pct": 50, "revert_after_s": 0}', 422, "out_of_range", "revert_after_s"),
        (b'{"power_limit_pct": 50, "revert_after_s": 1e6}', 422, "out_of_range", "revert_after_s"),
        (b'{"on": true}', 422, "not_applicable", "on applies to smartplug modules only"),
        (b'{"battery_power_w": 100}', 422, "not_applicable", "battery_power_w applies to energystorage"),
    ],
)
async def test_bad_control_bodies(
    case: tuple[bytes, int, str, str], serve: Serve, http: aiohttp.ClientSession
) -> None:
    body, status, code, message_part = case
    module = inverter()
    server = await serve(module)
    got_status, data = await post_control(http, server, body)
    assert got_status == status
    assert_error(data, code, message_part)
    assert module.received == []


async def test_error_details_name_the_field(serve: Serve, http: aiohttp.ClientSession) -> None:
    server = await serve(inverter())
    _, data = await post_control(http, server, {"power_limit_pct": "x"})
    assert data["error"]["details"] == {"field": "power_limit_pct"}
    _, data = await post_control(http, server, {"on": True})
    assert data["error"]["details"] == {"field": "on", "kind": "microinverter"}


async def test_battery_limits_and_module_refusal_are_422(serve: Serve, http: aiohttp.ClientSession) -> None:
    class ColdBattery(StaticModule):
        def apply(self, setpoint: Setpoint, *, revert_after_s: float | None = None) -> None:
            raise ValueError("battery is too cold to charge")

    server = await serve(StaticModule(info=BATTERY))
    status, data = await post_control(http, server, {"battery_power_w": 2600})
    assert status == 422
    assert_error(data, "out_of_range", "exceeds max_discharge_w 2500")
    status, data = await post_control(http, server, {"battery_power_w": -2001})
    assert status == 422
    assert_error(data, "out_of_range", "exceeds max_charge_w 2000")

    server = await serve(ColdBattery(info=BATTERY))
    status, data = await post_control(http, server, {"battery_power_w": -100})
    assert status == 422
    assert_error(data, "out_of_range", "battery is too cold to charge")


async def test_conflicts_are_409(serve: Serve, http: aiohttp.ClientSession) -> None:
    faulty = inverter(state=OperatingState.FAULT)
    server = await serve(faulty)
    status, data = await post_control(http, server, {"power_limit_pct": 10})
    assert status == 409
    assert_error(data, "not_allowed_in_state", "fault")
    status, _ = await post_control(http, server, {"release": True})
    assert status == 200  # a release is always allowed

    fixed = StaticModule(info=dataclasses.replace(INVERTER, capabilities=Capabilities(controllable=False)))
    server = await serve(fixed)
    status, data = await post_control(http, server, {"power_limit_pct": 10})
    assert status == 409
    assert_error(data, "not_controllable")
    assert fixed.received == []


async def test_oversized_body_is_413(serve: Serve, http: aiohttp.ClientSession) -> None:
    server = await serve(inverter())
    body = b'{"power_limit_pct": 50, "pad": "' + b"x" * MAX_BODY_BYTES + b'"}'
    status, data = await post_control(http, server, body)
    assert status == 413
    assert_error(data, "body_too_large")


async def test_unknown_path_and_wrong_method(serve: Serve, http: aiohttp.ClientSession) -> None:
    server = await serve(inverter())
    status, data, _ = await call(http, "GET", url(server, "firmware"))
    assert status == 404
    assert_error(data, "not_found", "/ores/v1/firmware")
    status, data, response = await call(http, "GET", url(server, "control"))
    assert status == 405
    assert_error(data, "method_not_allowed", "GET")
    assert "POST" in response.headers["Allow"]
    status, data, response = await call(http, "POST", url(server, "telemetry"), b"{}")
    assert status == 405
    assert "GET" in response.headers["Allow"]


# ----------------------------------------------------------------------------------------- authentication


async def test_bearer_is_required_except_for_identity(serve: Serve, http: aiohttp.ClientSession) -> None:
    module = inverter()
    server = await serve(module, credential="tok-123")
    status, _, _ = await call(http, "GET", url(server, "identity"))
    assert status == 200
    for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic tok-123"}):
        for method, endpoint in (("GET", "status"), ("GET", "telemetry"), ("POST", "control")):
            status, data, response = await call(http, method, url(server, endpoint), b'{"on": true}', headers)
            assert status == 401
            assert_error(data, "unauthorized")
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
    good = {"Authorization": "Bearer tok-123"}
    status, _, _ = await call(http, "GET", url(server, "telemetry"), None, good)
    assert status == 200
    status, _, _ = await call(http, "POST", url(server, "control"), b'{"power_limit_pct": 5}', good)
    assert status == 200
    assert module.received == [(Setpoint(power_limit_pct=5.0), None)]


# ----------------------------------------------------------------------------------------- lifecycle


async def test_stop_closes_everything(http: aiohttp.ClientSession) -> None:
    server = await start_ores_http_server(inverter())
    status, _, _ = await call(http, "GET", url(server, "telemetry"))  # leaves a keep-alive connection open
    assert status == 200
    await server.stop()
    await server.stop()  # safe twice
    with pytest.raises(aiohttp.ClientConnectionError):
        await call(http, "GET", url(server, "telemetry"))
    assert {t for t in asyncio.all_tasks() if t is not asyncio.current_task()} == set()


async def test_two_servers_get_distinct_ports(serve: Serve) -> None:
    first = await serve(inverter())
    second = await serve(StaticModule(info=BATTERY))
    assert first.address.port != second.address.port


# ----------------------------------------------------------------------------------------- §6 attestation

VENDOR_KEY = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"sim test vendor").digest())
ATTESTATION = make_sim_attestation(
    VENDOR_KEY, vendor="Acme Solar", model="MI-400", serial="MI-0001", seed=b"sim test device"
)
CHALLENGE = "auth/challenge"
CREDENTIAL = "auth/credential"
JSON = {"Content-Type": "application/json"}


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}", **JSON}


async def call_empty(
    http: aiohttp.ClientSession,
    method: str,
    target: str,
    body: object = None,
    headers: dict[str, str] | None = None,
) -> int:
    """A request whose success answer is 204 without a body."""
    data = None if body is None else json.dumps(body).encode()
    async with http.request(method, target, data=data, headers=headers) as response:
        raw = await response.read()
        if response.status == 204:
            assert raw == b""
        return response.status


async def test_without_attestation_auth_endpoints_are_404(serve: Serve, http: aiohttp.ClientSession) -> None:
    server = await serve(inverter())
    body = json.dumps({"nonce": base64.b64encode(bytes(32)).decode(), "hub_id": "h"}).encode()
    for method, endpoint in (("POST", CHALLENGE), ("POST", CREDENTIAL), ("DELETE", CREDENTIAL)):
        status, data, _ = await call(http, method, url(server, endpoint), body, JSON)
        assert status == 404
        assert_error(data, "not_found")


async def test_challenge_is_signed_with_the_device_key(serve: Serve, http: aiohttp.ClientSession) -> None:
    server = await serve(inverter(), attestation=ATTESTATION)
    nonce = bytes(range(32))
    body = json.dumps({"nonce": base64.b64encode(nonce).decode(), "hub_id": "hub-1"}).encode()
    status, data, _ = await call(http, "POST", url(server, CHALLENGE), body, JSON)
    assert status == 200
    assert set(data) == {"certificate", "signature"}
    cert = DeviceCertificate.from_wire(data["certificate"])
    assert cert == ATTESTATION.certificate
    signature = base64.b64decode(data["signature"])
    trusted = {key_id(VENDOR_KEY.public_key()): TrustAnchor("Acme Solar", VENDOR_KEY.public_key())}
    verify_attestation(
        cert, signature, nonce=nonce, hub_id="hub-1", trusted=trusted, claimed=("Acme Solar", "MI-0001")
    )
    _, identity, _ = await call(http, "GET", url(server, "identity"))
    assert identity["provisioned"] is False


@pytest.mark.parametrize(
    ("body", "message_part"),
    [
        (b"not json", "body is not JSON"),
        (b"[]", "expected an object"),
        (b'{"hub_id": "h"}', "missing required field 'nonce'"),
        (b'{"nonce": "AAAA", "hub_id": "h"}', "must be 16..64 bytes"),
        (b'{"nonce": "@@@@", "hub_id": "h"}', "not base64"),
        (b'{"nonce": "AAAAAAAAAAAAAAAAAAAAAA==", "hub_id": "a\\u0000b"}', "hub_id"),
        (b'{"nonce": "AAAAAAAAAAAAAAAAAAAAAA=="}', "missing required field 'hub_id'"),
    ],
)
async def test_malformed_challenge_is_400(
    body: bytes, message_part: str, serve: Serve, http: aiohttp.ClientSession
) -> None:
    server = await serve(inverter(), attestation=ATTESTATION)
    status, data, _ = await call(http, "POST", url(server, CHALLENGE), body, JSON)
    assert status == 400
    assert_error(data, "bad_request", message_part)


async def test_provisioning_locks_the_module_to_its_credential(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    module = inverter()
    server = await serve(module, attestation=ATTESTATION)
    assert not server.provisioned
    status, _, _ = await call(http, "GET", url(server, "telemetry"))
    assert status == 200  # unprovisioned: open

    credential = generate_credential()
    assert (
        await call_empty(
            http, "POST", url(server, CREDENTIAL), {"credential": credential, "hub_id": "hub-1"}, JSON
        )
        == 204
    )
    assert server.provisioned
    assert server.credential == credential
    assert server.hub_id == "hub-1"
    _, identity, _ = await call(http, "GET", url(server, "identity"))  # still open
    assert identity["provisioned"] is True

    for headers in (JSON, bearer(generate_credential()), {"Authorization": f"Basic {credential}", **JSON}):
        for method, endpoint in (("GET", "status"), ("GET", "telemetry"), ("POST", "control")):
            status, data, response = await call(
                http, method, url(server, endpoint), b'{"power_limit_pct": 5}', headers
            )
            assert status == 401
            assert_error(data, "unauthorized")
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert module.received == []

    status, _, _ = await call(http, "GET", url(server, "telemetry"), None, bearer(credential))
    assert status == 200
    status, _, _ = await call(
        http, "POST", url(server, "control"), b'{"power_limit_pct": 5}', bearer(credential)
    )
    assert status == 200
    assert module.received == [(Setpoint(power_limit_pct=5.0), None)]
    nonce = base64.b64encode(bytes(32)).decode()
    status, _, _ = await call(
        http, "POST", url(server, CHALLENGE), json.dumps({"nonce": nonce, "hub_id": "x"}).encode(), JSON
    )
    assert status == 200  # the challenge stays open


async def test_second_hub_cannot_take_over(serve: Serve, http: aiohttp.ClientSession) -> None:
    first = generate_credential()
    server = await serve(inverter(), attestation=ATTESTATION, credential=first)
    assert server.provisioned  # a credential given at start means provisioned
    takeover = {"credential": generate_credential(), "hub_id": "evil-hub"}
    status, data, _ = await call(http, "POST", url(server, CREDENTIAL), json.dumps(takeover).encode(), JSON)
    assert status == 401
    assert_error(data, "unauthorized")
    wrong = bearer(generate_credential())
    status, _, _ = await call(http, "POST", url(server, CREDENTIAL), json.dumps(takeover).encode(), wrong)
    assert status == 401
    status, _, _ = await call(http, "DELETE", url(server, CREDENTIAL), None, wrong)
    assert status == 401
    assert server.credential == first

    # the owner re-keys with its current credential; the old one stops working
    second = generate_credential()
    body = {"credential": second, "hub_id": "hub-1"}
    assert await call_empty(http, "POST", url(server, CREDENTIAL), body, bearer(first)) == 204
    status, _, _ = await call(http, "GET", url(server, "status"), None, bearer(first))
    assert status == 401
    status, _, _ = await call(http, "GET", url(server, "status"), None, bearer(second))
    assert status == 200


async def test_deprovision_returns_to_unprovisioned(serve: Serve, http: aiohttp.ClientSession) -> None:
    credential = generate_credential()
    server = await serve(inverter(), attestation=ATTESTATION, credential=credential)
    assert await call_empty(http, "DELETE", url(server, CREDENTIAL), None, bearer(credential)) == 204
    assert not server.provisioned
    assert server.hub_id is None
    _, identity, _ = await call(http, "GET", url(server, "identity"))
    assert identity["provisioned"] is False
    status, _, _ = await call(http, "GET", url(server, "telemetry"))
    assert status == 200
    assert await call_empty(http, "DELETE", url(server, CREDENTIAL)) == 204  # idempotent
    # and a new hub may provision it
    body = {"credential": generate_credential(), "hub_id": "hub-2"}
    assert await call_empty(http, "POST", url(server, CREDENTIAL), body, JSON) == 204
    assert server.hub_id == "hub-2"


@pytest.mark.parametrize(
    ("body", "message_part"),
    [
        ({"credential": "tok-123", "hub_id": "h"}, "not base64"),
        ({"credential": base64.b64encode(bytes(16)).decode(), "hub_id": "h"}, "expected 32 bytes"),
        ({"credential": base64.b64encode(bytes(32)).decode()}, "missing required field 'hub_id'"),
        ({"credential": base64.b64encode(bytes(32)).decode(), "hub_id": ""}, "hub_id"),
        ({"hub_id": "h"}, "missing required field 'credential'"),
    ],
)
async def test_malformed_credential_is_400_and_changes_nothing(
    body: dict[str, str], message_part: str, serve: Serve, http: aiohttp.ClientSession
) -> None:
    server = await serve(inverter(), attestation=ATTESTATION)
    status, data, _ = await call(http, "POST", url(server, CREDENTIAL), json.dumps(body).encode(), JSON)
    assert status == 400
    assert_error(data, "bad_request", message_part)
    assert not server.provisioned


async def test_legacy_credential_reports_provisioned(serve: Serve, http: aiohttp.ClientSession) -> None:
    server = await serve(inverter(), credential="tok-123")
    _, identity, _ = await call(http, "GET", url(server, "identity"))
    assert identity["provisioned"] is True
    status, _, _ = await call(http, "POST", url(server, CHALLENGE), b"{}", JSON)
    assert status == 404  # no attestation: the challenge is not implemented, and open


# ----------------------------------------------------------------------------------------- firmware (§9)

FIRMWARE = "firmware"
BEGIN = "firmware/begin"
IMAGE = "firmware/image"
INSTALL = "firmware/install"
ROLLBACK = "firmware/rollback"
OCTETS = {"Content-Type": "application/octet-stream"}


def inverter_firmware(signer: Signer, clock: ManualClock, **kwargs: Any) -> SimFirmware:
    identity = INVERTER.identity
    return SimFirmware(
        identity.vendor,
        identity.model,
        identity.firmware_version,
        trusted=signer.trust(),
        reboot_s=2.0,
        clock=clock,
        **kwargs,
    )


def begin_body(signer: Signer, image: bytes, version: str, **kwargs: Any) -> bytes:
    kwargs.setdefault("models", (INVERTER.identity.model,))
    manifest, signature = signer.release(image, version, **kwargs)
    return json.dumps(
        {"manifest": base64.b64encode(manifest).decode(), "signature": base64.b64encode(signature).decode()}
    ).encode()


async def put_chunk(
    http: aiohttp.ClientSession, server: OresHttpSimServer, offset: int | str, data: bytes
) -> tuple[int, Any]:
    status, body, _ = await call(http, "PUT", f"{url(server, IMAGE)}?offset={offset}", data, OCTETS)
    return status, body


async def test_firmware_endpoints_are_404_without_firmware(serve: Serve, http: aiohttp.ClientSession) -> None:
    server = await serve(inverter())
    assert server.firmware is None
    for method, endpoint in (("GET", FIRMWARE), ("POST", BEGIN), ("PUT", IMAGE), ("POST", INSTALL)):
        status, data, _ = await call(http, method, url(server, endpoint), b"{}", JSON)
        assert status == 404
        assert_error(data, "not_found")


async def test_a_whole_update_over_the_wire(serve: Serve, http: aiohttp.ClientSession) -> None:
    signer, clock = Signer.new("Acme Solar"), ManualClock()
    firmware = inverter_firmware(signer, clock)
    module = inverter()
    server = await serve(module, firmware=firmware)
    assert server.firmware is firmware
    status, data, _ = await call(http, "GET", url(server, FIRMWARE))
    assert (status, data) == (
        200,
        {
            "active_version": "1.2.3",
            "inactive_version": None,
            "state": "idle",
            "received_bytes": 0,
            "error": None,
        },
    )
    image = image_of(300_000)  # more than one chunk of 256 KiB
    status, data, _ = await call(http, "POST", url(server, BEGIN), begin_body(signer, image, "1.3.0"), JSON)
    assert (status, data) == (200, {"received_bytes": 0})
    assert await put_chunk(http, server, 0, image[:262_144]) == (200, {"received_bytes": 262_144})
    status, data, _ = await call(http, "GET", url(server, FIRMWARE))
    assert (data["state"], data["received_bytes"]) == ("receiving", 262_144)
    assert await put_chunk(http, server, 262_144, image[262_144:]) == (200, {"received_bytes": 300_000})
    # control before the update; the module starts at its default after the reboot
    await post_control(http, server, {"power_limit_pct": 40})

    status, data, _ = await call(http, "POST", url(server, INSTALL), b"", JSON)
    assert status == 202
    assert data["state"] == "rebooting"
    for endpoint in ("identity", "telemetry", FIRMWARE):
        status, data, response = await call(http, "GET", url(server, endpoint))
        assert status == 503
        assert_error(data, "unavailable", "rebooting")
        assert response.headers["Retry-After"] == "2"

    clock.advance(2.0)
    _, identity, _ = await call(http, "GET", url(server, "identity"))
    assert identity["firmware_version"] == "1.3.0"
    _, data, _ = await call(http, "GET", url(server, FIRMWARE))
    assert (data["active_version"], data["inactive_version"], data["state"]) == ("1.3.0", "1.2.3", "idle")
    _, status_body, _ = await call(http, "GET", url(server, "status"))
    assert status_body["uptime_s"] == 0.0
    assert status_body["setpoint"]["power_limit_pct"] is None
    assert module.received[-1][0] == Setpoint(release=True)


async def test_firmware_refusals_have_their_status_and_code(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    signer, clock = Signer.new("Acme Solar"), ManualClock()
    server = await serve(inverter(), firmware=inverter_firmware(signer, clock))
    image = image_of(5000)
    for body, code in (
        (begin_body(signer, image, "1.3.0", models=("MI-800",)), "wrong_model"),
        (begin_body(signer, image, "1.2.0"), "downgrade"),
        (begin_body(Signer.new("Acme Solar"), image, "1.3.0"), "untrusted_key"),
    ):
        status, data, _ = await call(http, "POST", url(server, BEGIN), body, JSON)
        assert status == 422
        assert_error(data, code)
    status, data, _ = await call(http, "POST", url(server, BEGIN), b'{"manifest": "!"}', JSON)
    assert status == 400
    assert_error(data, "bad_request")

    status, data = await put_chunk(http, server, 0, image)
    assert status == 409
    assert_error(data, "no_update")
    await call(http, "POST", url(server, BEGIN), begin_body(signer, image, "1.3.0"), JSON)
    status, data = await put_chunk(http, server, 100, image[:100])
    assert status == 409
    assert_error(data, "wrong_offset", "resume at 0")
    assert data["error"]["details"] == {"received_bytes": 0}
    for offset in ("", "-1", "1e3", "x"):
        status, data = await put_chunk(http, server, offset, image[:100])
        assert status == 400
        assert_error(data, "bad_request", "offset")
    status, data = await put_chunk(http, server, 0, bytes(256 * 1024 + 1))
    assert status == 413
    assert_error(data, "body_too_large")
    assert (await put_chunk(http, server, 0, image[:1000]))[0] == 200
    status, data, _ = await call(http, "POST", url(server, INSTALL))
    assert status == 422
    assert_error(data, "size_mismatch", "resume at 1000")
    status, data, _ = await call(http, "POST", url(server, ROLLBACK))
    assert status == 409
    assert_error(data, "no_previous")
    status, data, _ = await call(http, "GET", url(server, BEGIN))
    assert status == 405
    _, data, _ = await call(http, "GET", url(server, FIRMWARE))
    assert data["error"]["code"] == "no_previous"


async def test_firmware_needs_the_credential(serve: Serve, http: aiohttp.ClientSession) -> None:
    signer, clock = Signer.new("Acme Solar"), ManualClock()
    server = await serve(inverter(), credential="tok-123", firmware=inverter_firmware(signer, clock))
    status, data, _ = await call(http, "GET", url(server, FIRMWARE))
    assert status == 401
    assert_error(data, "unauthorized")
    status, _, _ = await call(http, "GET", url(server, FIRMWARE), headers={"Authorization": "Bearer tok-123"})
    assert status == 200


async def test_an_unhealthy_image_is_a_fault_until_rolled_back(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    signer, clock = Signer.new("Acme Solar"), ManualClock()
    server = await serve(
        inverter(), firmware=inverter_firmware(signer, clock, fail_versions=frozenset({"2.0.0"}))
    )
    image = image_of(2000)
    await call(http, "POST", url(server, BEGIN), begin_body(signer, image, "2.0.0"), JSON)
    await put_chunk(http, server, 0, image)
    assert (await call(http, "POST", url(server, INSTALL)))[0] == 202
    clock.advance(2.0)
    _, telemetry, _ = await call(http, "GET", url(server, "telemetry"))
    assert telemetry["state"] == "fault"
    _, status_body, _ = await call(http, "GET", url(server, "status"))
    assert [fault["code"] for fault in status_body["faults"]] == ["firmware_unhealthy"]
    status, data = await post_control(http, server, {"power_limit_pct": 50})
    assert status == 409
    assert_error(data, "not_allowed_in_state")

    status, data, _ = await call(http, "POST", url(server, ROLLBACK))
    assert (status, data["state"]) == (202, "rebooting")
    clock.advance(2.0)
    _, identity, _ = await call(http, "GET", url(server, "identity"))
    assert identity["firmware_version"] == "1.2.3"
    _, telemetry, _ = await call(http, "GET", url(server, "telemetry"))
    assert telemetry["state"] == "running"


def test_firmware_must_be_for_the_module() -> None:
    firmware = SimFirmware("Acme Solar", "MI-800", "1.0.0", trusted={})
    with pytest.raises(ValueError, match="MI-800"):
        OresHttpSimServer(inverter(), firmware=firmware)
