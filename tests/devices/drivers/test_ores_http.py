"""Tests of the ORES-HTTP driver against the real simulated module server and misbehaving servers.

Everything runs over real sockets on 127.0.0.1: the round trip per kind (identity, capabilities, telemetry
values and signs, control reaching the module including the watchdog), errors the protocol defines (4xx on
control, authentication), and servers that break the protocol in every way the driver must survive, each
mapped to its ``devices.errors`` exception with the reason in the log.  A hypothesis test feeds arbitrary
JSON-ish bodies to the telemetry parser.  The authentication of §6 runs end to end as the hub does it
(``ChallengeBook`` nonce, ``authenticate`` against the sim, ``verify_attestation`` with a real ``TrustStore``),
with each attack the issue names as its own test, then provisioning, re-keying and deprovisioning.  The
firmware update of §9 runs through the driver against the sim's A/B slots with real signed releases and a
manual reboot clock: a whole update, resume, every refusal by the module, and an unhealthy image rolled back.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import math
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices.attest import (
    BadCertificate,
    BadSignature,
    ChallengeBook,
    DeviceCertificate,
    IdentityMismatch,
    ReplayedNonce,
    SimAttestation,
    UntrustedVendor,
    key_id,
    make_sim_attestation,
    verify_attestation,
)
from devices.drivers.base import Address, Driver, FirmwareCapable, FirmwareSlots
from devices.drivers.ores_http import OresHttpDriver, parse_identity_body, parse_telemetry_body
from devices.errors import (
    AuthenticationFailed,
    CommandRejected,
    DeviceUnreachable,
    NotSupported,
    ProtocolError,
)
from devices.model import (
    Capabilities,
    DeviceInfo,
    DeviceKind,
    Identity,
    OperatingState,
    Setpoint,
    Telemetry,
)
from devices.ores_http_wire import MAX_BODY_BYTES, generate_credential, identity_to_wire
from devices.sim.base import StaticModule
from devices.sim.firmware import SimFirmware
from devices.sim.ores_http_server import OresHttpSimServer, start_ores_http_server
from hub.trust import TrustStore
from tests.devices.sim.test_firmware import ManualClock, Signer, image_of
from tests.serving import serving

LOGGER_NAME = "devices.drivers.ores_http"

# -------------------- modules per kind

MODULES: dict[DeviceKind, tuple[DeviceInfo, Telemetry]] = {
    DeviceKind.MICROINVERTER: (
        DeviceInfo(
            DeviceKind.MICROINVERTER,
            Identity("Acme Solar", "MI-400", "MI-0001", "1.2.3"),
            Capabilities(rated_power_w=400.0),
        ),
        Telemetry(
            ts=0.0,
            state=OperatingState.THROTTLED,
            power_w=312.5,
            energy_out_wh=81234.5,
            energy_in_wh=0.0,
            voltage_v=121.3,
            current_a=2.58,
            frequency_hz=60.01,
            temperature_c=41.0,
            power_limit_pct=80.0,
        ),
    ),
    DeviceKind.ENERGYSTORAGE: (
        DeviceInfo(
            DeviceKind.ENERGYSTORAGE,
            Identity("Acme Storage", "B-5", "B5-0042", "2.1.0"),
            Capabilities(
                rated_power_w=2500.0,
                capacity_wh=5000.0,
                max_charge_w=2000.0,
                max_discharge_w=2500.0,
                min_soc_pct=10.0,
                max_soc_pct=95.0,
            ),
        ),
        # charging at 1.2 kW: negative power, energy_in grows
        Telemetry(
            ts=0.0, power_w=-1200.0, energy_out_wh=900.0, energy_in_wh=1100.0, soc_pct=64.2, soh_pct=98.0
        ),
    ),
    DeviceKind.METER: (
        DeviceInfo(
            DeviceKind.METER, Identity("Acme Grid", "M-1", "M1-7", "0.9"), Capabilities(controllable=False)
        ),
        # exporting 450 W to the grid: negative power
        Telemetry(ts=0.0, power_w=-450.0, energy_out_wh=123456.0, energy_in_wh=654.0, grid_ok=True),
    ),
    DeviceKind.SMARTPLUG: (
        DeviceInfo(
            DeviceKind.SMARTPLUG,
            Identity("Acme Plugs", "P-1", "P1-99", "3.0"),
            Capabilities(rated_power_w=3680.0, priority=2, critical=True),
        ),
        # a 60 W load consuming: negative power
        Telemetry(ts=0.0, power_w=-60.0, energy_in_wh=42.0, on=True),
    ),
}

APPLICABLE: dict[DeviceKind, Setpoint] = {
    DeviceKind.MICROINVERTER: Setpoint(power_limit_pct=50.0),
    DeviceKind.ENERGYSTORAGE: Setpoint(battery_power_w=-800.0),
    DeviceKind.SMARTPLUG: Setpoint(on=False),
}


def static_module(kind: DeviceKind, **sample_changes: object) -> StaticModule:
    info, sample = MODULES[kind]
    return StaticModule(info=info, sample=replace(sample, **sample_changes))  # type: ignore[arg-type]


ServeFn = Callable[..., Awaitable[OresHttpSimServer]]
DriverFn = Callable[..., OresHttpDriver]


@pytest.fixture
async def serve() -> AsyncIterator[ServeFn]:
    async for start in serving(start_ores_http_server):
        yield start


@pytest.fixture
async def make_driver() -> AsyncIterator[DriverFn]:
    drivers: list[OresHttpDriver] = []

    def make(address: Address, **kwargs: object) -> OresHttpDriver:
        driver = OresHttpDriver(address, **kwargs)  # type: ignore[arg-type]
        drivers.append(driver)
        return driver

    yield make
    for driver in drivers:
        await driver.close()


# -------------------- hand-written servers

RawHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[dict[str, RawHandler]], Awaitable[Address]]]:
    """Start an aiohttp server whose endpoints under /ores/v1 are the given handlers."""
    runners: list[web.AppRunner] = []

    async def start(handlers: dict[str, RawHandler]) -> Address:
        app = web.Application()
        for name, handler in handlers.items():
            app.router.add_route("*", f"/ores/v1/{name}", handler)
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        return Address("http", "127.0.0.1", int(runner.addresses[0][1]), "/ores/v1")

    yield start
    for runner in runners:
        await runner.cleanup()


def body_handler(body: bytes | str, status: int = 200, content_type: str = "application/json") -> RawHandler:
    data = body.encode() if isinstance(body, str) else body

    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=status, body=data, content_type=content_type)

    return handler


def json_handler(value: object, status: int = 200) -> RawHandler:
    return body_handler(json.dumps(value), status)


VALID_TELEMETRY = {"ts": "2025-06-01T12:00:00.250Z", "state": "running", "power_w": 312.5}
VALID_IDENTITY = {
    "protocol": "ores-http",
    "protocol_version": "1.0",
    "kind": "microinverter",
    "vendor": "Acme",
    "model": "MI",
    "serial": "S1",
    "firmware_version": "1",
}


@pytest.fixture
def log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger=LOGGER_NAME)
    return caplog


def logged(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name == LOGGER_NAME)


# -------------------- round trips


def test_driver_satisfies_the_driver_protocol() -> None:
    driver = OresHttpDriver(Address.parse("http://127.0.0.1:8080"))
    assert isinstance(driver, Driver)
    assert OresHttpDriver.protocol == "ores-http"
    assert OresHttpDriver.schemes == ("http",)
    assert driver.address.path == "/ores/v1"


@pytest.mark.parametrize("kind", list(MODULES))
async def test_round_trip_identity_and_telemetry(
    kind: DeviceKind, serve: ServeFn, make_driver: DriverFn
) -> None:
    module = static_module(kind)
    server = await serve(module)
    driver = make_driver(server.address)

    info = await driver.probe()
    assert info == module.info  # kind, identity and every capability survive the wire
    assert driver.info == info

    before = time.time()
    sample = await driver.read()
    after = time.time()
    assert replace(sample, ts=0.0) == module.sample  # values and signs exactly as the module reported
    assert before - 0.001 <= sample.ts <= after  # ts crosses the wire as ISO 8601 with milliseconds


async def test_signs_follow_the_hub_convention(serve: ServeFn, make_driver: DriverFn) -> None:
    readings = {}
    for kind in MODULES:
        server = await serve(static_module(kind))
        readings[kind] = await make_driver(server.address).read()
    assert readings[DeviceKind.MICROINVERTER].power_w == 312.5  # producing
    assert readings[DeviceKind.ENERGYSTORAGE].power_w == -1200.0  # charging
    assert readings[DeviceKind.METER].power_w == -450.0  # exporting
    assert readings[DeviceKind.SMARTPLUG].power_w == -60.0  # consuming


@pytest.mark.parametrize("kind", list(APPLICABLE))
async def test_control_reaches_the_module_with_its_watchdog(
    kind: DeviceKind, serve: ServeFn, make_driver: DriverFn
) -> None:
    module = static_module(kind)
    server = await serve(module)
    driver = make_driver(server.address)
    setpoint = APPLICABLE[kind]

    before = time.time()
    await driver.apply(setpoint, revert_after_s=30.0)
    after = time.time()

    assert module.received == [(setpoint, 30.0)]
    status = await driver.status()
    assert status.active.setpoint == setpoint
    assert status.active.revert_at is not None
    assert before + 30.0 - 0.001 <= status.active.revert_at <= after + 30.0


async def test_control_is_reflected_in_telemetry(serve: ServeFn, make_driver: DriverFn) -> None:
    inverter = static_module(DeviceKind.MICROINVERTER)
    plug = static_module(DeviceKind.SMARTPLUG)
    inv_driver = make_driver((await serve(inverter)).address)
    plug_driver = make_driver((await serve(plug)).address)
    await inv_driver.apply(Setpoint(power_limit_pct=25.0))
    await plug_driver.apply(Setpoint(on=False))
    assert (await inv_driver.read()).power_limit_pct == 25.0
    assert (await plug_driver.read()).on is False


async def test_control_returns_the_accepted_setpoint_without_watchdog(
    serve: ServeFn, make_driver: DriverFn
) -> None:
    module = static_module(DeviceKind.ENERGYSTORAGE)
    driver = make_driver((await serve(module)).address)
    active = await driver.control(Setpoint(battery_power_w=1500.0))
    assert active is not None
    assert active.setpoint == Setpoint(battery_power_w=1500.0)
    assert active.revert_at is None
    assert module.received == [(Setpoint(battery_power_w=1500.0), None)]


async def test_watchdog_expiry_shows_in_status(serve: ServeFn, make_driver: DriverFn) -> None:
    module = static_module(DeviceKind.MICROINVERTER)
    driver = make_driver((await serve(module)).address)
    await driver.apply(Setpoint(power_limit_pct=40.0), revert_after_s=0.05)
    deadline = time.monotonic() + 10.0
    while (status := await driver.status()).active.setpoint != Setpoint():
        assert time.monotonic() < deadline, f"setpoint never reverted: {status}"
        await asyncio.sleep(0.01)
    assert status.active.revert_at is None


async def test_release_returns_module_to_default(serve: ServeFn, make_driver: DriverFn) -> None:
    module = static_module(DeviceKind.MICROINVERTER)
    driver = make_driver((await serve(module)).address)
    await driver.apply(Setpoint(power_limit_pct=40.0), revert_after_s=60.0)
    await driver.apply(Setpoint(release=True), revert_after_s=60.0)
    assert module.received[-1] == (Setpoint(release=True), None)
    status = await driver.status()
    assert status.active.setpoint == Setpoint()
    assert status.active.revert_at is None


async def test_empty_setpoint_sends_nothing(serve: ServeFn, make_driver: DriverFn) -> None:
    module = static_module(DeviceKind.MICROINVERTER)
    driver = make_driver((await serve(module)).address)
    assert await driver.control(Setpoint()) is None
    assert module.received == []


# -------------------- control refusals


async def test_setpoint_for_another_kind_is_not_supported(serve: ServeFn, make_driver: DriverFn) -> None:
    module = static_module(DeviceKind.MICROINVERTER)
    server = await serve(module)
    unprobed = make_driver(server.address)
    with pytest.raises(NotSupported, match="applies to smartplug"):
        await unprobed.apply(Setpoint(on=True))  # the module answers 422 not_applicable
    probed = make_driver(server.address)
    await probed.probe()
    with pytest.raises(NotSupported, match="on does not apply to a microinverter"):
        await probed.apply(Setpoint(on=True))  # refused before sending
    assert module.received == []


@pytest.mark.parametrize(
    "case",
    [
        (DeviceKind.MICROINVERTER, Setpoint(power_limit_pct=150.0), "out_of_range: control.power_limit_pct"),
        (DeviceKind.ENERGYSTORAGE, Setpoint(battery_power_w=3000.0), "exceeds max_discharge_w 2500"),
        (DeviceKind.ENERGYSTORAGE, Setpoint(battery_power_w=-2500.0), "exceeds max_charge_w 2000"),
    ],
)
async def test_out_of_range_setpoint_is_rejected(
    case: tuple[DeviceKind, Setpoint, str],
    serve: ServeFn,
    make_driver: DriverFn,
    log: pytest.LogCaptureFixture,
) -> None:
    kind, setpoint, reason = case
    module = static_module(kind)
    driver = make_driver((await serve(module)).address)
    with pytest.raises(CommandRejected, match="HTTP 422") as exc:
        await driver.apply(setpoint)
    assert reason in str(exc.value)
    assert reason in logged(log)
    assert module.received == []


async def test_module_value_error_reaches_the_hub(serve: ServeFn, make_driver: DriverFn) -> None:
    class ColdBattery(StaticModule):
        def apply(self, setpoint: Setpoint, *, revert_after_s: float | None = None) -> None:
            raise ValueError("battery is too cold to charge")

    info, sample = MODULES[DeviceKind.ENERGYSTORAGE]
    driver = make_driver((await serve(ColdBattery(info=info, sample=sample))).address)
    with pytest.raises(CommandRejected, match="HTTP 422 out_of_range: battery is too cold to charge"):
        await driver.apply(Setpoint(battery_power_w=-100.0))


async def test_control_in_fault_or_on_uncontrollable_module_is_refused(
    serve: ServeFn, make_driver: DriverFn
) -> None:
    faulty = static_module(DeviceKind.MICROINVERTER, state=OperatingState.FAULT)
    driver = make_driver((await serve(faulty)).address)
    with pytest.raises(CommandRejected, match="HTTP 409 not_allowed_in_state"):
        await driver.apply(Setpoint(power_limit_pct=10.0))
    await driver.apply(Setpoint(release=True))  # a release is always allowed
    assert faulty.received == [(Setpoint(release=True), None)]

    info, sample = MODULES[DeviceKind.SMARTPLUG]
    fixed = StaticModule(info=replace(info, capabilities=Capabilities(controllable=False)), sample=sample)
    driver = make_driver((await serve(fixed)).address)
    with pytest.raises(CommandRejected, match="HTTP 409 not_controllable"):
        await driver.apply(Setpoint(on=False))


async def test_non_finite_setpoint_is_rejected_locally(serve: ServeFn, make_driver: DriverFn) -> None:
    module = static_module(DeviceKind.ENERGYSTORAGE)
    driver = make_driver((await serve(module)).address)
    with pytest.raises(CommandRejected, match="not finite"):
        await driver.apply(Setpoint(battery_power_w=math.nan))
    assert module.received == []


# -------------------- authentication


async def test_bearer_credential(
    serve: ServeFn, make_driver: DriverFn, log: pytest.LogCaptureFixture
) -> None:
    module = static_module(DeviceKind.SMARTPLUG)
    server = await serve(module, credential="s3cret-token")

    anonymous = make_driver(server.address)
    assert await anonymous.probe() == module.info  # /identity stays open
    with pytest.raises(AuthenticationFailed, match="HTTP 401 unauthorized"):
        await anonymous.read()
    assert "HTTP 401 unauthorized" in logged(log)

    wrong = make_driver(server.address, credential="not-it")
    with pytest.raises(AuthenticationFailed):
        await wrong.apply(Setpoint(on=False))
    assert module.received == []

    right = make_driver(server.address, credential="s3cret-token")
    assert (await right.read()).on is True
    await right.apply(Setpoint(on=False))
    assert module.received == [(Setpoint(on=False), None)]


async def test_forbidden_on_control_is_an_authentication_failure(
    raw_server: Callable[[dict[str, RawHandler]], Awaitable[Address]], make_driver: DriverFn
) -> None:
    error = {"error": {"code": "forbidden", "message": "not yours", "details": {}}}
    address = await raw_server({"control": json_handler(error, 403)})
    with pytest.raises(AuthenticationFailed, match="not yours"):
        await make_driver(address).apply(Setpoint(on=True))


def test_credential_must_be_header_safe() -> None:
    address = Address.parse("http://127.0.0.1:1")
    for bad in ("", "two words", "line\nbreak", "ünïcode"):
        with pytest.raises(ValueError):
            OresHttpDriver(address, credential=bad)


# -------------------- connection handling


async def test_polls_reuse_one_keep_alive_connection(
    raw_server: Callable[[dict[str, RawHandler]], Awaitable[Address]], make_driver: DriverFn
) -> None:
    peers: list[object] = []

    async def telemetry(request: web.Request) -> web.Response:
        assert request.transport is not None
        peers.append(request.transport.get_extra_info("peername"))
        return web.json_response(VALID_TELEMETRY)

    driver = make_driver(await raw_server({"telemetry": telemetry}))
    for _ in range(5):
        await driver.read()
    assert len(peers) == 5
    assert len(set(peers)) == 1  # the same client socket every time


async def test_close_is_idempotent_and_the_driver_reopens(serve: ServeFn) -> None:
    server = await serve(static_module(DeviceKind.METER))
    driver = OresHttpDriver(server.address)
    await driver.close()  # before any request
    assert (await driver.read()).grid_ok is True
    await driver.close()
    await driver.close()
    assert (await driver.read()).grid_ok is True  # a new session after close
    await driver.close()


async def test_stopping_leaves_no_tasks(serve: ServeFn) -> None:
    server = await serve(static_module(DeviceKind.METER))
    driver = OresHttpDriver(server.address)
    await driver.probe()
    await driver.read()
    await driver.close()
    await server.stop()
    assert {t for t in asyncio.all_tasks() if t is not asyncio.current_task()} == set()


# -------------------- misbehaving servers


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"ts": "2025-06-01T12:00:00Z", "state": "running", "power_w": 1', "body is not JSON"),
        (b"\xff\xfe not utf-8", "body is not UTF-8"),
        (b"[1, 2, 3]", "telemetry: expected an object, got array"),
        (
            b'{"ts": "2025-06-01T12:00:00Z", "state": "running", "power_w": "312"}',
            "telemetry.power_w: expected a number",
        ),
        (
            b'{"ts": "2025-06-01T12:00:00Z", "state": "running", "power_w": true}',
            "telemetry.power_w: expected a number",
        ),
        (b'{"ts": 1748779200, "state": "running", "power_w": 1}', "telemetry.ts: expected a string"),
        (b'{"ts": "2025-06-01T12:00:00", "state": "running", "power_w": 1}', "has no UTC offset"),
        (b'{"ts": "yesterday", "state": "running", "power_w": 1}', "not an ISO 8601 timestamp"),
        (b'{"ts": "2025-06-01T12:00:00Z", "state": 3, "power_w": 1}', "telemetry.state: expected a string"),
        (b'{"ts": "2025-06-01T12:00:00Z", "state": "running", "power_w": 1, "on": "yes"}', "telemetry.on"),
        (b'{"state": "running", "power_w": 1}', "missing required field 'ts'"),
        (b'{"ts": "2025-06-01T12:00:00Z", "state": "running"}', "missing required field 'power_w'"),
        (b'{"ts": "2025-06-01T12:00:00Z", "state": "running", "power_w": NaN}', "JSON constant NaN"),
        (
            b'{"ts": "2025-06-01T12:00:00Z", "state": "running", "power_w": -Infinity}',
            "JSON constant -Infinity",
        ),
        (b'{"ts": "2025-06-01T12:00:00Z", "state": "running", "power_w": 1e999}', "number must be finite"),
        (
            b'{"ts": "2025-06-01T12:00:00Z", "state": "running", "power_w": 1' + b"0" * 400 + b"}",
            "number too large",
        ),
        (b'{"ts": "2025-06-01T12:00:00Z", "state": "running", "power_w": 1, "soc_pct": 140}', "soc_pct: 140"),
        (b"[" * 60000, "nested too deeply"),
    ],
    ids=lambda v: v[:40].decode("utf-8", "replace") if isinstance(v, bytes) else None,
)
async def test_malformed_telemetry_is_a_protocol_error(
    body: bytes,
    reason: str,
    raw_server: Callable[[dict[str, RawHandler]], Awaitable[Address]],
    make_driver: DriverFn,
    log: pytest.LogCaptureFixture,
) -> None:
    driver = make_driver(await raw_server({"telemetry": body_handler(body)}))
    with pytest.raises(ProtocolError) as exc:
        await driver.read()
    assert reason in str(exc.value)
    assert reason in logged(log)
    assert any(r.levelno == logging.WARNING for r in log.records if r.name == LOGGER_NAME)


async def test_unknown_enum_values_and_fields_are_tolerated(
    raw_server: Callable[[dict[str, RawHandler]], Awaitable[Address]], make_driver: DriverFn
) -> None:
    identity = {**VALID_IDENTITY, "kind": "windturbine", "colour": "green", "capabilities": {"future_w": 1}}
    telemetry = {**VALID_TELEMETRY, "state": "hibernating", "reactive_power_var": 12.0}
    address = await raw_server({"identity": json_handler(identity), "telemetry": json_handler(telemetry)})
    driver = make_driver(address)
    info = await driver.probe()
    assert info.kind is DeviceKind.UNKNOWN
    assert info.identity == Identity("Acme", "MI", "S1", "1")
    sample = await driver.read()
    assert sample.state is OperatingState.UNKNOWN
    assert sample.power_w == 312.5
    assert sample.ts == datetime(2025, 6, 1, 12, 0, 0, 250000, tzinfo=UTC).timestamp()


async def test_huge_body_is_refused(
    raw_server: Callable[[dict[str, RawHandler]], Awaitable[Address]],
    make_driver: DriverFn,
    log: pytest.LogCaptureFixture,
) -> None:
    padding = " " * (MAX_BODY_BYTES + 10)

    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            for _ in range(64):  # 2 MiB in 32 KiB chunks, no Content-Length
                await response.write(b" " * 32768)
            await response.write_eof()
        except ConnectionResetError:
            pass
        return response

    address = await raw_server(
        {"telemetry": body_handler(json.dumps(VALID_TELEMETRY) + padding), "identity": chunked}
    )
    driver = make_driver(address)
    with pytest.raises(ProtocolError, match=f"exceeds {MAX_BODY_BYTES} bytes"):
        await driver.read()  # announced by Content-Length
    with pytest.raises(ProtocolError, match=f"exceeds {MAX_BODY_BYTES} bytes"):
        await driver.probe()  # streamed without a length
    assert f"response body exceeds {MAX_BODY_BYTES} bytes" in logged(log)


async def test_server_errors(
    raw_server: Callable[[dict[str, RawHandler]], Awaitable[Address]],
    make_driver: DriverFn,
    log: pytest.LogCaptureFixture,
) -> None:
    error = {"error": {"code": "internal_error", "message": "sensor bus failed", "details": {}}}
    address = await raw_server(
        {
            "telemetry": json_handler(error, 500),
            "status": body_handler("<html>busy</html>", 503, "text/html"),
        }
    )
    driver = make_driver(address)
    with pytest.raises(ProtocolError, match="HTTP 500 internal_error: sensor bus failed"):
        await driver.read()
    with pytest.raises(DeviceUnreachable, match="HTTP 503"):
        await driver.status()
    assert "HTTP 500 internal_error: sensor bus failed" in logged(log)


@pytest.mark.parametrize(
    ("handler", "reason"),
    [
        (body_handler("not found", 404, "text/plain"), "HTTP 404"),
        (body_handler("<html>router admin</html>", 200, "text/html"), "identity is not JSON"),
        (json_handler({"name": "some other device"}), "protocol is None"),
        (
            json_handler({**VALID_IDENTITY, "protocol_version": "2.0"}),
            "protocol version 2.0 is not supported",
        ),
    ],
    ids=["404", "html", "other-json", "major-2"],
)
async def test_probe_of_something_else_is_not_supported(
    handler: RawHandler,
    reason: str,
    raw_server: Callable[[dict[str, RawHandler]], Awaitable[Address]],
    make_driver: DriverFn,
    log: pytest.LogCaptureFixture,
) -> None:
    driver = make_driver(await raw_server({"identity": handler}))
    with pytest.raises(NotSupported) as exc:
        await driver.probe()
    assert reason in str(exc.value)
    assert reason in logged(log)
    assert driver.info is None


@pytest.mark.parametrize(
    ("identity", "reason"),
    [
        ({k: v for k, v in VALID_IDENTITY.items() if k != "serial"}, "missing required field 'serial'"),
        ({**VALID_IDENTITY, "vendor": "  "}, "identity.vendor: must not be empty"),
        ({**VALID_IDENTITY, "protocol_version": "one"}, "expected 'MAJOR.MINOR'"),
        ({**VALID_IDENTITY, "capabilities": {"rated_power_w": -5}}, "rated_power_w: -5 is outside"),
        ({**VALID_IDENTITY, "capabilities": {"priority": 1.5}}, "priority: expected an integer"),
        ({**VALID_IDENTITY, "capabilities": []}, "capabilities: expected an object"),
    ],
)
async def test_malformed_ores_identity_is_a_protocol_error(
    identity: dict[str, object],
    reason: str,
    raw_server: Callable[[dict[str, RawHandler]], Awaitable[Address]],
    make_driver: DriverFn,
) -> None:
    driver = make_driver(await raw_server({"identity": json_handler(identity)}))
    with pytest.raises(ProtocolError) as exc:
        await driver.probe()
    assert reason in str(exc.value)


async def test_control_errors_from_a_foreign_server(
    raw_server: Callable[[dict[str, RawHandler]], Awaitable[Address]],
    make_driver: DriverFn,
    log: pytest.LogCaptureFixture,
) -> None:
    conflict = {
        "error": {"code": "not_allowed_in_state", "message": "module is updating firmware", "details": {}}
    }
    address = await raw_server({"control": json_handler(conflict, 409)})
    with pytest.raises(CommandRejected, match="HTTP 409 not_allowed_in_state: module is updating firmware"):
        await make_driver(address).apply(Setpoint(on=True))
    assert "module is updating firmware" in logged(log)

    address = await raw_server({"control": body_handler("nope", 400, "text/plain")})
    with pytest.raises(CommandRejected, match="HTTP 400"):
        await make_driver(address).apply(Setpoint(on=True))

    address = await raw_server({"control": json_handler({"power_limit_pct": "fifty"})})
    with pytest.raises(ProtocolError, match=r"control reply\.power_limit_pct: expected a number"):
        await make_driver(address).apply(Setpoint(power_limit_pct=50.0))


async def test_slow_server_is_unreachable(
    raw_server: Callable[[dict[str, RawHandler]], Awaitable[Address]],
    make_driver: DriverFn,
    log: pytest.LogCaptureFixture,
) -> None:
    never = asyncio.Event()
    entered = asyncio.Event()

    async def stuck(request: web.Request) -> web.Response:
        entered.set()
        await never.wait()  # never set: the module hangs
        return web.json_response(VALID_TELEMETRY)

    driver = make_driver(await raw_server({"telemetry": stuck}), timeout=0.2)
    try:
        with pytest.raises(DeviceUnreachable, match=r"no answer within 0\.2 s"):
            await driver.read()
    finally:
        never.set()
    assert entered.is_set()  # the request did reach the server: the timeout, not a refusal, ended it
    assert "no answer within 0.2 s" in logged(log)


@pytest.fixture
def refused_address() -> Iterator[Address]:
    """A port that is bound but not listening: connections to it are refused, and nobody else can take it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield Address("http", "127.0.0.1", sock.getsockname()[1], "/ores/v1")


async def test_connection_refused_is_unreachable(
    refused_address: Address, make_driver: DriverFn, log: pytest.LogCaptureFixture
) -> None:
    driver = make_driver(refused_address)
    with pytest.raises(DeviceUnreachable, match="Cannot connect"):
        await driver.probe()
    with pytest.raises(DeviceUnreachable):
        await driver.read()
    with pytest.raises(DeviceUnreachable):
        await driver.apply(Setpoint(on=True))
    assert "Cannot connect" in logged(log)


async def test_repeated_failure_is_logged_once_at_warning(
    raw_server: Callable[[dict[str, RawHandler]], Awaitable[Address]],
    make_driver: DriverFn,
    log: pytest.LogCaptureFixture,
) -> None:
    driver = make_driver(await raw_server({"telemetry": body_handler(b"garbage")}))
    for _ in range(3):
        with pytest.raises(ProtocolError):
            await driver.read()
    levels = [r.levelno for r in log.records if r.name == LOGGER_NAME]
    assert levels == [logging.WARNING, logging.DEBUG, logging.DEBUG]


# -------------------- property test

_leaf = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
_json = st.recursive(
    _leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_timestamps = st.one_of(
    st.datetimes(timezones=st.none() | st.timezones()).map(datetime.isoformat),
    st.sampled_from(
        ["2025-06-01T12:00:00Z", "2025-06-01", "0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"]
    ),
    _json,
)
_telemetry_like = st.fixed_dictionaries(
    {},
    optional={
        "ts": _timestamps,
        "state": st.sampled_from([s.value for s in OperatingState]) | _json,
        **{
            name: st.floats(allow_nan=True, allow_infinity=True) | _json
            for name in (
                "power_w",
                "energy_out_wh",
                "energy_in_wh",
                "voltage_v",
                "current_a",
                "frequency_hz",
                "temperature_c",
                "soc_pct",
                "soh_pct",
                "power_limit_pct",
            )
        },
        "on": st.booleans() | _json,
        "grid_ok": st.booleans() | _json,
    },
)
_bodies = st.one_of(
    _telemetry_like.map(lambda v: json.dumps(v).encode()),
    _json.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=64),
    st.text(max_size=64).map(str.encode),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=_bodies)
def test_telemetry_parser_only_raises_protocol_error(body: bytes) -> None:
    try:
        sample = parse_telemetry_body(body)
    except ProtocolError:
        return
    assert isinstance(sample, Telemetry)
    assert math.isfinite(sample.ts)
    for value in (sample.power_w, sample.energy_out_wh, sample.soc_pct, sample.power_limit_pct):
        assert value is None or math.isfinite(value)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=_json.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=64))
def test_identity_parser_only_raises_protocol_errors(body: bytes) -> None:
    with contextlib.suppress(NotSupported, ProtocolError):
        parse_identity_body(body)


# -------------------- §6 authentication, hub side end to end

HUB_ID = "hub-under-test"
VENDOR_KEY = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"driver test vendor").digest())
INVERTER_INFO = MODULES[DeviceKind.MICROINVERTER][0]


def inverter_attestation(
    vendor_key: Ed25519PrivateKey = VENDOR_KEY, *, vendor: str = "Acme Solar", serial: str = "MI-0001"
) -> SimAttestation:
    return make_sim_attestation(vendor_key, vendor=vendor, model="MI-400", serial=serial)


@pytest.fixture
async def trust(tmp_path: Path) -> TrustStore:
    store = await TrustStore.open(tmp_path / "trust.json")
    await store.add("Acme Solar", VENDOR_KEY.public_key(), ["device"])
    return store


async def challenge(
    driver: OresHttpDriver, store: TrustStore, book: ChallengeBook | None = None
) -> DeviceCertificate:
    """What the hub's onboarding does: probe, fresh nonce, ask, consume the nonce, verify."""
    info = await driver.probe()
    book = book or ChallengeBook()
    nonce = book.issue()
    cert, signature = await driver.authenticate(nonce, HUB_ID)
    book.consume(nonce)
    return verify_attestation(
        cert,
        signature,
        nonce=nonce,
        hub_id=HUB_ID,
        trusted=store.trusted("device"),
        claimed=(info.identity.vendor, info.identity.serial),
    )


async def test_authenticate_provision_deprovision(
    serve: ServeFn, make_driver: DriverFn, trust: TrustStore
) -> None:
    attestation = inverter_attestation()
    server = await serve(static_module(DeviceKind.MICROINVERTER), attestation=attestation)
    driver = make_driver(server.address)

    cert = await challenge(driver, trust)
    assert cert == attestation.certificate
    assert driver.provisioned is False

    credential = generate_credential()
    await driver.provision(credential, HUB_ID)
    assert server.credential == credential
    assert server.hub_id == HUB_ID
    assert driver.has_credential
    assert (await driver.read()).power_w == 312.5
    await driver.probe()
    assert driver.provisioned is True
    with pytest.raises(AuthenticationFailed, match="HTTP 401"):
        await make_driver(server.address).read()  # another client, without the credential
    assert await challenge(make_driver(server.address), trust) == cert  # proving identity stays open

    await driver.deprovision()
    assert not server.provisioned
    assert not driver.has_credential
    assert driver.provisioned is False
    assert (await make_driver(server.address).read()).power_w == 312.5


async def test_attack_module_signs_with_another_key(
    serve: ServeFn, make_driver: DriverFn, trust: TrustStore, log: pytest.LogCaptureFixture
) -> None:
    """A module that copied a genuine certificate but holds another device key."""
    genuine = inverter_attestation()
    impostor = SimAttestation(Ed25519PrivateKey.generate(), genuine.certificate)
    server = await serve(static_module(DeviceKind.MICROINVERTER), attestation=impostor)
    with pytest.raises(BadSignature, match="does not verify with the certified device key"):
        await challenge(make_driver(server.address), trust)
    assert "BadSignature" in log.text


async def test_attack_certificate_from_untrusted_vendor(
    serve: ServeFn, make_driver: DriverFn, trust: TrustStore, log: pytest.LogCaptureFixture
) -> None:
    rogue = inverter_attestation(Ed25519PrivateKey.generate())
    server = await serve(static_module(DeviceKind.MICROINVERTER), attestation=rogue)
    with pytest.raises(UntrustedVendor, match="does not trust"):
        await challenge(make_driver(server.address), trust)
    assert "UntrustedVendor" in log.text


async def test_attack_serial_not_matching_the_certificate(
    serve: ServeFn, make_driver: DriverFn, trust: TrustStore, log: pytest.LogCaptureFixture
) -> None:
    """A genuine module of the vendor, announcing someone else's serial."""
    other_serial = inverter_attestation(serial="MI-0002")
    server = await serve(static_module(DeviceKind.MICROINVERTER), attestation=other_serial)
    with pytest.raises(IdentityMismatch, match="'MI-0001' but its certificate is for 'Acme Solar'/'MI-0002'"):
        await challenge(make_driver(server.address), trust)
    assert "IdentityMismatch" in log.text


def relay_server_handlers(answer: Callable[[bytes, str], object]) -> dict[str, RawHandler]:
    """A man in the middle: a genuine /identity, and /auth/challenge answered by ``answer(nonce, hub_id)``."""

    async def identity(request: web.Request) -> web.Response:
        return web.json_response(identity_to_wire(INVERTER_INFO))

    async def auth(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response(answer(base64.b64decode(body["nonce"]), body["hub_id"]))

    return {"identity": identity, "auth/challenge": auth}


async def test_attack_replayed_answer(
    raw_server: Callable[[dict[str, RawHandler]], Awaitable[Address]],
    make_driver: DriverFn,
    trust: TrustStore,
) -> None:
    """An attacker recorded a genuine module's answer and plays it back to the next challenge."""
    genuine = inverter_attestation()
    recorded_nonce = ChallengeBook().issue()
    cert, signature = genuine.respond(recorded_nonce, HUB_ID)
    recording = {"certificate": cert.to_wire(), "signature": base64.b64encode(signature).decode()}
    driver = make_driver(await raw_server(relay_server_handlers(lambda nonce, hub_id: recording)))
    with pytest.raises(BadSignature):
        await challenge(driver, trust)  # a fresh nonce: the recorded signature is over another one

    # and the hub never accepts the same nonce twice, even with a valid answer
    book = ChallengeBook()
    nonce = book.issue()
    book.consume(nonce)
    with pytest.raises(ReplayedNonce, match="already used"):
        book.consume(nonce)


async def test_attack_certificate_tampered_in_transit(
    raw_server: Callable[[dict[str, RawHandler]], Awaitable[Address]],
    make_driver: DriverFn,
    trust: TrustStore,
) -> None:
    genuine = inverter_attestation(serial="MI-0007")

    def tampered(nonce: bytes, hub_id: str) -> object:
        cert, signature = genuine.respond(nonce, hub_id)
        return {
            "certificate": {**cert.to_wire(), "serial": "MI-0001"},  # matches the announced serial now
            "signature": base64.b64encode(signature).decode(),
        }

    driver = make_driver(await raw_server(relay_server_handlers(tampered)))
    with pytest.raises(BadCertificate, match="certificate signature does not verify"):
        await challenge(driver, trust)


async def test_removed_vendor_key_refuses_its_modules(
    serve: ServeFn, make_driver: DriverFn, trust: TrustStore
) -> None:
    server = await serve(static_module(DeviceKind.MICROINVERTER), attestation=inverter_attestation())
    driver = make_driver(server.address)
    await challenge(driver, trust)
    await trust.remove(key_id(VENDOR_KEY.public_key()))
    with pytest.raises(UntrustedVendor):
        await challenge(driver, trust)


_CERT_WIRE = inverter_attestation().certificate.to_wire()
_SIG = base64.b64encode(bytes(64)).decode()


@pytest.mark.parametrize(
    "case",
    [
        (body_handler("not json"), ProtocolError, "body is not JSON"),
        (json_handler([1]), ProtocolError, "expected an object"),
        (json_handler({"signature": _SIG}), ProtocolError, "missing required field 'certificate'"),
        (json_handler({"certificate": _CERT_WIRE}), ProtocolError, "missing required field 'signature'"),
        (
            json_handler({"certificate": {**_CERT_WIRE, "device_key": "AAAA"}, "signature": _SIG}),
            ProtocolError,
            "malformed certificate: device_key",
        ),
        (json_handler({"certificate": "x", "signature": _SIG}), ProtocolError, "malformed certificate"),
        (json_handler({"certificate": _CERT_WIRE, "signature": "AAAA"}), ProtocolError, "expected 64 bytes"),
        (
            json_handler({"error": {"code": "internal_error", "message": "hsm", "details": {}}}, 500),
            ProtocolError,
            "HTTP 500",
        ),
        (
            json_handler({"error": {"code": "unauthorized", "message": "no", "details": {}}}, 401),
            AuthenticationFailed,
            "HTTP 401",
        ),
        (body_handler("missing", 404, "text/plain"), NotSupported, "HTTP 404"),
    ],
    ids=[
        "not-json",
        "array",
        "no-cert",
        "no-sig",
        "bad-key",
        "cert-string",
        "short-sig",
        "500",
        "401",
        "404",
    ],
)
async def test_malformed_challenge_answers(
    case: tuple[RawHandler, type[Exception], str],
    raw_server: Callable[[dict[str, RawHandler]], Awaitable[Address]],
    make_driver: DriverFn,
    log: pytest.LogCaptureFixture,
) -> None:
    handler, error, reason = case
    driver = make_driver(await raw_server({"auth/challenge": handler}))
    with pytest.raises(error) as exc:
        await driver.authenticate(ChallengeBook().issue(), HUB_ID)
    assert reason in str(exc.value)
    assert reason in logged(log)


async def test_module_without_authentication_is_not_supported(serve: ServeFn, make_driver: DriverFn) -> None:
    server = await serve(static_module(DeviceKind.MICROINVERTER))  # no attestation: a legacy module
    driver = make_driver(server.address)
    await driver.probe()
    assert driver.provisioned is None  # /identity does not say
    with pytest.raises(NotSupported, match="HTTP 404"):
        await driver.authenticate(ChallengeBook().issue(), HUB_ID)
    with pytest.raises(NotSupported, match="HTTP 404"):
        await driver.provision(generate_credential(), HUB_ID)
    with pytest.raises(NotSupported, match="HTTP 404"):
        await driver.deprovision()


async def test_authenticate_refuses_bad_arguments_locally(make_driver: DriverFn) -> None:
    driver = make_driver(Address.parse("http://127.0.0.1:1"))
    with pytest.raises(ValueError, match="nonce"):
        await driver.authenticate(b"short", HUB_ID)
    with pytest.raises(ValueError, match="hub_id"):
        await driver.authenticate(bytes(32), "nul\0inside")


async def test_provision_refused_when_another_hub_owns_the_module(
    serve: ServeFn, make_driver: DriverFn
) -> None:
    owner = generate_credential()
    server = await serve(
        static_module(DeviceKind.MICROINVERTER), attestation=inverter_attestation(), credential=owner
    )
    intruder = make_driver(server.address)
    with pytest.raises(AuthenticationFailed, match="HTTP 401"):
        await intruder.provision(generate_credential(), "other-hub")
    assert not intruder.has_credential
    with pytest.raises(AuthenticationFailed, match="HTTP 401"):
        await intruder.deprovision()
    assert server.credential == owner

    # the owner re-keys: the new credential is used at once, the old one is dead
    driver = make_driver(server.address, credential=owner)
    new = generate_credential()
    await driver.provision(new, HUB_ID)
    assert server.credential == new
    await driver.read()
    with pytest.raises(AuthenticationFailed):
        await make_driver(server.address, credential=owner).read()


async def test_set_credential_takes_effect_at_once(serve: ServeFn, make_driver: DriverFn) -> None:
    credential = generate_credential()
    server = await serve(static_module(DeviceKind.SMARTPLUG), credential=credential)
    driver = make_driver(server.address)
    with pytest.raises(AuthenticationFailed):
        await driver.read()
    driver.set_credential(credential)
    assert (await driver.read()).on is True  # same session, new header
    driver.set_credential(None)
    with pytest.raises(AuthenticationFailed):
        await driver.read()
    for bad in ("", "two words", "ünïcode"):
        with pytest.raises(ValueError):
            driver.set_credential(bad)


# -------------------- firmware update (§9)

FW_INFO = MODULES[DeviceKind.MICROINVERTER][0]
FW_VENDOR, FW_MODEL, FW_RUNNING = FW_INFO.identity.vendor, FW_INFO.identity.model, "1.2.3"


async def firmware_module(
    serve: ServeFn,
    signer: Signer,
    clock: ManualClock,
    *,
    fail_versions: frozenset[str] = frozenset(),
    **kwargs: object,
) -> tuple[OresHttpSimServer, SimFirmware]:
    firmware = SimFirmware(
        FW_VENDOR,
        FW_MODEL,
        FW_RUNNING,
        trusted=signer.trust(),
        reboot_s=5.0,
        clock=clock,
        fail_versions=fail_versions,
    )
    server = await serve(static_module(DeviceKind.MICROINVERTER), firmware=firmware, **kwargs)
    return server, firmware


async def update_to(driver: OresHttpDriver, signer: Signer, image: bytes, version: str) -> None:
    """The hub's side of a transfer: begin, chunks of 64 KiB from the resume point, install."""
    offset = await driver.firmware_begin(*signer.release(image, version, models=(FW_MODEL,)))
    while offset < len(image):
        offset = await driver.firmware_chunk(offset, image[offset : offset + 65536])
    await driver.firmware_install()


def test_driver_is_firmware_capable() -> None:
    driver = OresHttpDriver(Address.parse("http://127.0.0.1:8080"))
    assert isinstance(driver, FirmwareCapable)
    assert driver.firmware_chunk_bytes == 256 * 1024


async def test_firmware_update_through_the_driver(serve: ServeFn, make_driver: DriverFn) -> None:
    signer, clock = Signer.new(FW_VENDOR), ManualClock()
    server, _firmware = await firmware_module(serve, signer, clock)
    driver = make_driver(server.address)
    assert await driver.firmware_status() == FirmwareSlots(FW_RUNNING, None, "idle", 0, None)
    image = image_of(600_000)
    assert await driver.firmware_begin(*signer.release(image, "1.3.0", models=(FW_MODEL,))) == 0
    assert await driver.firmware_chunk(0, image[:100_000]) == 100_000
    assert (await driver.firmware_status()).received_bytes == 100_000
    # one call larger than a request may carry: the driver splits it into PUTs of 256 KiB
    assert await driver.firmware_chunk(100_000, image[100_000:]) == 600_000
    await driver.firmware_install()

    with pytest.raises(DeviceUnreachable, match="503"):
        await driver.probe()
    with pytest.raises(DeviceUnreachable, match="rebooting"):
        await driver.firmware_status()
    clock.advance(5.0)
    info = await driver.probe()
    assert info.identity.firmware_version == "1.3.0"
    assert await driver.firmware_status() == FirmwareSlots("1.3.0", FW_RUNNING, "idle", 0, None)
    assert (await driver.read()).state is not OperatingState.FAULT


async def test_interrupted_transfer_resumes(serve: ServeFn, make_driver: DriverFn) -> None:
    signer, clock = Signer.new(FW_VENDOR), ManualClock()
    server, firmware = await firmware_module(serve, signer, clock)
    image = image_of(200_000)
    release = signer.release(image, "1.3.0", models=(FW_MODEL,))
    first = make_driver(server.address)
    assert await first.firmware_begin(*release) == 0
    assert await first.firmware_chunk(0, image[:100_000]) == 100_000
    await first.close()  # the hub stops half-way (restart, lost link)

    second = make_driver(server.address)
    with pytest.raises(CommandRejected, match=r"wrong_offset.*resume at 100000"):
        await second.firmware_chunk(0, image[:1000])
    assert await second.firmware_begin(*release) == 100_000
    assert await second.firmware_chunk(100_000, image[100_000:]) == 200_000
    await second.firmware_install()
    clock.advance(5.0)
    assert firmware.running_version == "1.3.0"
    assert (await second.probe()).identity.firmware_version == "1.3.0"


async def test_module_refuses_a_tampered_image(serve: ServeFn, make_driver: DriverFn) -> None:
    signer, clock = Signer.new(FW_VENDOR), ManualClock()
    server, firmware = await firmware_module(serve, signer, clock)
    driver = make_driver(server.address)
    image = image_of(50_000)
    tampered = bytearray(image)
    tampered[25_000] ^= 0x80
    await driver.firmware_begin(*signer.release(image, "1.3.0", models=(FW_MODEL,)))
    assert await driver.firmware_chunk(0, bytes(tampered)) == 50_000
    with pytest.raises(CommandRejected, match="422 hash_mismatch") as info:
        await driver.firmware_install()
    assert "SHA-256" in str(info.value)
    assert not firmware.rebooting
    status = await driver.firmware_status()
    assert (status.active_version, status.inactive_version, status.state) == (FW_RUNNING, None, "failed")
    assert (status.error or "").startswith("hash_mismatch: ")
    assert (await driver.probe()).identity.firmware_version == FW_RUNNING


@pytest.mark.parametrize(
    ("make_release", "code"),
    [
        (lambda s, o, img: s.release(img, "1.3.0", models=("MI-800",)), "wrong_model"),
        (lambda s, o, img: s.release(img, "1.0.0", models=(FW_MODEL,)), "downgrade"),
        (lambda s, o, img: s.release(img, FW_RUNNING, models=(FW_MODEL,)), "not_newer"),
        (lambda s, o, img: (s.release(img, "1.3.0", models=(FW_MODEL,))[0], bytes(64)), "bad_signature"),
        (lambda s, o, img: (s.release(img, "1.3.0", models=(FW_MODEL,))[0], b"unsigned"), "bad_signature"),
        (  # a valid manifest signed by someone else with the vendor's key id
            lambda s, o, img: (
                (manifest := s.release(img, "1.3.0", models=(FW_MODEL,))[0]),
                o.key.sign(manifest),
            ),
            "bad_signature",
        ),
        (lambda s, o, img: o.release(img, "1.3.0", models=(FW_MODEL,)), "untrusted_key"),
    ],
)
async def test_module_refuses_releases_with_its_reason(
    make_release: Callable[[Signer, Signer, bytes], tuple[bytes, bytes]],
    code: str,
    serve: ServeFn,
    make_driver: DriverFn,
) -> None:
    signer, clock = Signer.new(FW_VENDOR), ManualClock()
    server, firmware = await firmware_module(serve, signer, clock)
    driver = make_driver(server.address)
    manifest, signature = make_release(signer, Signer.new(FW_VENDOR), image_of(1000))
    with pytest.raises(CommandRejected, match=f"422 {code}"):
        await driver.firmware_begin(manifest, signature)
    assert firmware.status().state == "idle"
    assert (await driver.firmware_status()).error is not None


async def test_unhealthy_image_is_rolled_back(serve: ServeFn, make_driver: DriverFn) -> None:
    signer, clock = Signer.new(FW_VENDOR), ManualClock()
    server, _firmware = await firmware_module(serve, signer, clock, fail_versions=frozenset({"2.0.0"}))
    driver = make_driver(server.address)
    with pytest.raises(CommandRejected, match="no_previous"):
        await driver.firmware_rollback()
    await update_to(driver, signer, image_of(30_000), "2.0.0")
    clock.advance(5.0)
    assert (await driver.probe()).identity.firmware_version == "2.0.0"
    assert (await driver.read()).state is OperatingState.FAULT
    assert [f.code for f in (await driver.status()).faults] == ["firmware_unhealthy"]

    await driver.firmware_rollback()
    with pytest.raises(DeviceUnreachable):
        await driver.read()
    clock.advance(5.0)
    assert (await driver.probe()).identity.firmware_version == FW_RUNNING
    assert (await driver.read()).state is OperatingState.THROTTLED  # the module's own state again
    assert await driver.firmware_status() == FirmwareSlots(FW_RUNNING, "2.0.0", "idle", 0, None)


async def test_firmware_errors_of_the_transport(serve: ServeFn, make_driver: DriverFn) -> None:
    plain = await serve(static_module(DeviceKind.MICROINVERTER))
    with pytest.raises(NotSupported, match="404"):
        await make_driver(plain.address).firmware_status()
    signer, clock = Signer.new(FW_VENDOR), ManualClock()
    server, _firmware = await firmware_module(serve, signer, clock, credential="tok-123")
    with pytest.raises(AuthenticationFailed):
        await make_driver(server.address).firmware_begin(*signer.release(b"x", "1.3.0", models=(FW_MODEL,)))
    driver = make_driver(server.address, credential="tok-123")
    assert await driver.firmware_begin(*signer.release(b"x", "1.3.0", models=(FW_MODEL,))) == 0
    with pytest.raises(ValueError, match="manifest"):
        await driver.firmware_begin(bytes(64 * 1024 + 1), bytes(64))
    with pytest.raises(ValueError, match="offset"):
        await driver.firmware_chunk(-1, b"x")
