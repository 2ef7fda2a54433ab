"""Onboarding against real ORES-HTTP modules with real signatures: policies, approval, credentials, moves,
and the attacks of issue 3 (each rejected with a logged reason, nothing registered changes)."""

from __future__ import annotations

import base64
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from devices.attest import DeviceCertificate, SimAttestation, make_sim_attestation
from devices.drivers.base import Address
from devices.model import DeviceKind
from devices.sim.base import SimServer, StaticModule
from devices.sim.ores_http_server import start_ores_http_server
from devices.sim.sunspec_server import start_sunspec_server
from discovery.base import Sighting, Source
from hub.onboarding import MAX_CANDIDATES, CandidateStatus
from tests.hub.conftest import Hub, make_module
from tests.hub.test_api import assert_error, until

VENDOR = "Test Vendor"


def raw_b64(key: Ed25519PrivateKey) -> str:
    return base64.b64encode(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()


@dataclass
class Lab:
    hub: Hub
    vendor_key: Ed25519PrivateKey
    servers: list[SimServer]

    async def module(
        self,
        kind: DeviceKind,
        serial: str,
        *,
        attestation: Any = "default",
        port: int = 0,
        module: StaticModule | None = None,
    ) -> tuple[StaticModule, Any]:
        module = module or make_module(kind, serial)
        if attestation == "default":
            ident = module.info.identity
            attestation = make_sim_attestation(
                self.vendor_key, vendor=ident.vendor, model=ident.model, serial=ident.serial
            )
        server = await start_ores_http_server(module, port=port, attestation=attestation)
        self.servers.append(server)
        return module, server

    def announce(self, server: SimServer, *, serial: str | None = None, vendor: str = VENDOR) -> Sighting:
        info = server.module.info
        sighting = Sighting(
            source=Source.MDNS,
            key=f"{vendor}-{serial or info.identity.serial}._ores._tcp.local.",
            kind=info.kind,
            vendor=vendor,
            model=info.identity.model,
            serial=serial or info.identity.serial,
            protocol="ores-http" if server.address.scheme == "http" else "sunspec-modbus",
            address=server.address,
        )
        self.hub.ctx.onboarding.seen(sighting)
        return sighting

    async def examined(self, sighting: Sighting) -> Any:
        return await self.hub.ctx.onboarding.wait_examined(sighting.claimed_id)


@pytest.fixture
async def lab(hub: Hub) -> Any:
    vendor_key = Ed25519PrivateKey.generate()
    status, body = await hub.request(
        "POST",
        "/hub/trust",
        json_body={"vendor": VENDOR, "public_key": raw_b64(vendor_key), "purposes": ["device"]},
    )
    assert status == 201, body
    servers: list[SimServer] = []
    yield Lab(hub, vendor_key, servers)
    for server in servers:
        await server.stop()


async def discovery(hub: Hub) -> dict[str, Any]:
    status, body = await hub.request("GET", "/device/discovery")
    assert status == 200, body
    return dict(body)


# --------------------------------------------------------------------------------------------- policies


async def test_approve_policy_lists_a_verified_module_until_a_user_approves_it(lab: Lab) -> None:
    hub = lab.hub
    _module, server = await lab.module(DeviceKind.MICROINVERTER, "INV-A1")
    sighting = lab.announce(server)
    cand = await lab.examined(sighting)
    assert cand.status is CandidateStatus.VERIFIED
    listed = (await discovery(hub))["candidates"]
    assert [(c["candidate_id"], c["identity_proven"], c["status"]) for c in listed] == [
        (sighting.claimed_id, True, "verified")
    ]
    assert hub.ctx.registry.get(sighting.claimed_id) is None  # approve policy: nothing without the user

    status, body = await hub.request(
        "POST", "/device/register", json_body={"candidate_id": sighting.claimed_id}
    )
    assert status == 201, body
    assert body["authenticated"] is True
    assert (await discovery(hub))["candidates"] == []
    # The module now holds a credential from this hub and answers only it.
    assert server.provisioned  # type: ignore[attr-defined]
    url = f"http://127.0.0.1:{server.address.port}/ores/v1/telemetry"
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        assert resp.status == 401
    live = hub.ctx.state.devices[sighting.claimed_id]
    await until(lambda: live.online and live.telemetry is not None, what="polled with the credential")
    status, sec = await hub.request("GET", "/device/security/authenticate")
    assert sec["devices"][0]["provisioned"] is True
    status, res = await hub.request(
        "POST", "/device/security/authenticate", json_body={"device_id": sighting.claimed_id}
    )
    assert res["ok"] is True
    # Removing the module hands it back: unprovisioned, ready for another hub.
    status, _ = await hub.request("DELETE", f"/device/register/{sighting.claimed_id}")
    assert status == 200
    assert not server.provisioned  # type: ignore[attr-defined]


async def test_auto_policy_registers_verified_modules_only_while_the_window_is_open(lab: Lab) -> None:
    hub = lab.hub
    status, _ = await hub.request("PATCH", "/hub/configure", json_body={"onboarding_policy": "auto"})
    assert status == 200
    _, first = await lab.module(DeviceKind.SMARTPLUG, "PLUG-A1")
    s1 = lab.announce(first)
    assert (await lab.examined(s1)).status is CandidateStatus.VERIFIED
    assert hub.ctx.registry.get(s1.claimed_id) is None  # window closed: waits
    status, body = await hub.request(
        "POST", "/device/discovery", json_body={"action": "open_window", "duration_s": 60}
    )
    assert status == 200 and body["window_open"] is True
    await until(
        lambda: hub.ctx.registry.get(s1.claimed_id) is not None, what="registered when the window opened"
    )
    _, second = await lab.module(DeviceKind.SMARTPLUG, "PLUG-A2")
    s2 = lab.announce(second)
    await until(lambda: hub.ctx.registry.get(s2.claimed_id) is not None, what="registered at once")
    record = hub.ctx.registry.get(s2.claimed_id)
    assert record is not None and record.authenticated
    status, body = await hub.request("POST", "/device/discovery", json_body={"action": "close_window"})
    assert body["window_open"] is False
    _, third = await lab.module(DeviceKind.SMARTPLUG, "PLUG-A3")
    s3 = lab.announce(third)
    assert (await lab.examined(s3)).status is CandidateStatus.VERIFIED
    assert hub.ctx.registry.get(s3.claimed_id) is None


async def test_legacy_sunspec_module_needs_explicit_approval_and_stays_unauthenticated(lab: Lab) -> None:
    hub = lab.hub
    await hub.request("PATCH", "/hub/configure", json_body={"onboarding_policy": "auto"})
    await hub.request("POST", "/device/discovery", json_body={"action": "open_window", "duration_s": 60})
    module = make_module(DeviceKind.MICROINVERTER, "SUNSPEC-1")
    server = await start_sunspec_server(module)
    lab.servers.append(server)
    sighting = lab.announce(server)
    cand = await lab.examined(sighting)
    assert cand.status is CandidateStatus.UNVERIFIED
    assert not cand.proven
    assert hub.ctx.registry.get(sighting.claimed_id) is None  # never automatic
    status, body = await hub.request(
        "POST", "/device/register", json_body={"candidate_id": sighting.claimed_id}
    )
    assert status == 201, body
    assert body["authenticated"] is False
    assert body["protocol"] == "sunspec-modbus"


async def test_an_ores_module_without_a_certificate_is_unverified(lab: Lab) -> None:
    _, server = await lab.module(DeviceKind.METER, "MTR-1", attestation=None)
    cand = await lab.examined(lab.announce(server))
    assert cand.status is CandidateStatus.UNVERIFIED


# --------------------------------------------------------------------------------------------- attacks


async def assert_rejected(
    lab: Lab, sighting: Sighting, caplog: pytest.LogCaptureFixture, reason: str
) -> None:
    cand = await lab.examined(sighting)
    assert cand.status is CandidateStatus.REJECTED
    assert cand.reason is not None and reason in cand.reason, cand.reason
    rejected = (await discovery(lab.hub))["rejected"]
    assert any(reason in r["reason"] for r in rejected), rejected
    assert reason in caplog.text
    status, body = await lab.hub.request(
        "POST", "/device/register", json_body={"candidate_id": sighting.claimed_id}
    )
    assert status == 409
    assert_error(body, "not_approvable")
    assert lab.hub.ctx.registry.get(sighting.claimed_id) is None


async def test_module_signing_with_the_wrong_key_is_rejected(
    lab: Lab, caplog: pytest.LogCaptureFixture
) -> None:
    genuine = make_sim_attestation(lab.vendor_key, vendor=VENDOR, model="T-microinverter", serial="INV-W")
    forged = SimAttestation(Ed25519PrivateKey.generate(), genuine.certificate)  # the certificate, not the key
    _, server = await lab.module(DeviceKind.MICROINVERTER, "INV-W", attestation=forged)
    with caplog.at_level(logging.WARNING):
        await assert_rejected(lab, lab.announce(server), caplog, "signature")


async def test_certificate_from_an_untrusted_vendor_is_rejected(
    lab: Lab, caplog: pytest.LogCaptureFixture
) -> None:
    stranger = Ed25519PrivateKey.generate()
    att = make_sim_attestation(stranger, vendor=VENDOR, model="T-microinverter", serial="INV-U")
    _, server = await lab.module(DeviceKind.MICROINVERTER, "INV-U", attestation=att)
    with caplog.at_level(logging.WARNING):
        await assert_rejected(lab, lab.announce(server), caplog, "not trust")


async def test_replayed_nonce_response_is_rejected(lab: Lab, caplog: pytest.LogCaptureFixture) -> None:
    genuine = make_sim_attestation(lab.vendor_key, vendor=VENDOR, model="T-microinverter", serial="INV-R")
    recorded = genuine.respond(b"\x01" * 32, lab.hub.ctx.settings.hub_id)  # an answer to an old challenge

    class Replayer(SimAttestation):
        def respond(self, nonce: bytes, hub_id: str) -> tuple[DeviceCertificate, bytes]:
            return recorded

    _, server = await lab.module(
        DeviceKind.MICROINVERTER,
        "INV-R",
        attestation=Replayer(Ed25519PrivateKey.generate(), genuine.certificate),
    )
    with caplog.at_level(logging.WARNING):
        await assert_rejected(lab, lab.announce(server), caplog, "signature")


async def test_serial_not_matching_the_certificate_is_rejected(
    lab: Lab, caplog: pytest.LogCaptureFixture
) -> None:
    # The module's certificate is genuine, but for another serial than the one it reports.
    att = make_sim_attestation(lab.vendor_key, vendor=VENDOR, model="T-microinverter", serial="OTHER-1")
    _, server = await lab.module(DeviceKind.MICROINVERTER, "INV-S", attestation=att)
    with caplog.at_level(logging.WARNING):
        await assert_rejected(lab, lab.announce(server), caplog, "OTHER-1")


async def test_announcement_claiming_another_serial_is_rejected(
    lab: Lab, caplog: pytest.LogCaptureFixture
) -> None:
    _, server = await lab.module(DeviceKind.MICROINVERTER, "INV-C")
    with caplog.at_level(logging.WARNING):
        await assert_rejected(lab, lab.announce(server, serial="SOMEONE-ELSE"), caplog, "announced as")


async def test_flood_of_fake_announcements_changes_nothing(lab: Lab) -> None:
    hub = lab.hub
    _, real = await lab.module(DeviceKind.METER, "MTR-REAL")
    s = lab.announce(real)
    await lab.examined(s)
    status, _ = await hub.request("POST", "/device/register", json_body={"candidate_id": s.claimed_id})
    assert status == 201
    before = hub.ctx.registry.all()
    ob = hub.ctx.onboarding
    started = time.monotonic()
    for n in range(1000):
        ob.seen(
            Sighting(
                source=Source.MDNS,
                key=f"fake-{n}._ores._tcp.local.",
                kind=DeviceKind.SMARTPLUG,
                vendor="Fake",
                model="F",
                serial=f"F{n:05d}",
                protocol="ores-http",
                address=Address(
                    "http", "127.0.0.1", 9, "/ores/v1"
                ),  # nothing listens: every probe fails fast
            )
        )
    assert time.monotonic() - started < 5  # handing 1,000 sightings over is cheap (no I/O on the loop)
    # The hub stays responsive while its workers chew through what they accepted.
    for _ in range(5):
        status, _ = await hub.request("GET", "/healthz")
        assert status == 200
    assert len(ob.candidates) <= MAX_CANDIDATES
    body = await discovery(hub)
    assert any("too many" in r["reason"] for r in body["rejected"])
    await until(
        lambda: all(c.status is not CandidateStatus.PENDING for c in ob.candidates.values()),
        timeout=60,
        what="accepted fakes examined",
    )
    assert hub.ctx.registry.all() == before


# --------------------------------------------------------------------------------------------- moves


async def test_known_module_at_a_new_address_moves_and_is_not_duplicated(lab: Lab) -> None:
    hub = lab.hub
    module, first = await lab.module(DeviceKind.ENERGYSTORAGE, "BAT-M")
    s = lab.announce(first)
    await lab.examined(s)
    await hub.request("POST", "/device/register", json_body={"candidate_id": s.claimed_id})
    credential = first.credential  # type: ignore[attr-defined]
    att = first.attestation  # type: ignore[attr-defined]
    await first.stop()
    # Same module (same keys, still provisioned with our credential), new port.
    second = await start_ores_http_server(module, credential=credential, attestation=att)
    lab.servers.append(second)
    lab.announce(second)
    await until(lambda: hub.ctx.registry.get(s.claimed_id).address == str(second.address), what="moved")  # type: ignore[union-attr]
    assert [r.device_id for r in hub.ctx.registry.all()] == [s.claimed_id]
    live = hub.ctx.state.devices[s.claimed_id]
    await until(lambda: live.online, what="polled at the new address")


async def test_impostor_claiming_a_registered_identity_is_refused_with_an_alert(
    lab: Lab, caplog: pytest.LogCaptureFixture
) -> None:
    hub = lab.hub
    _, genuine = await lab.module(DeviceKind.ENERGYSTORAGE, "BAT-I")
    s = lab.announce(genuine)
    await lab.examined(s)
    await hub.request("POST", "/device/register", json_body={"candidate_id": s.claimed_id})
    address_before = hub.ctx.registry.get(s.claimed_id).address  # type: ignore[union-attr]
    # Same identity, no certificate: it cannot prove it is the registered, authenticated battery.
    _, impostor = await lab.module(DeviceKind.ENERGYSTORAGE, "BAT-I", attestation=None)
    with caplog.at_level(logging.WARNING):
        lab.announce(impostor)
        await until(
            lambda: any("cannot prove" in r.reason for r in hub.ctx.onboarding.rejections), what="refused"
        )
    assert hub.ctx.registry.get(s.claimed_id).address == address_before  # type: ignore[union-attr]
    _, alerts = await hub.request("GET", "/app/notify", params={"active_only": "true"})
    assert any(a["kind"] == "identity_mismatch" for a in alerts["alerts"])


async def test_goodbye_marks_a_registered_module_offline_without_deleting_it(lab: Lab) -> None:
    hub = lab.hub
    _, server = await lab.module(DeviceKind.SMARTPLUG, "PLUG-G")
    s = lab.announce(server)
    await lab.examined(s)
    await hub.request("POST", "/device/register", json_body={"candidate_id": s.claimed_id})
    live = hub.ctx.state.devices[s.claimed_id]
    await until(lambda: live.online, what="online")
    await server.stop()
    hub.ctx.onboarding.gone(Source.MDNS, s.key, "goodbye")
    assert not live.online
    assert hub.ctx.registry.get(s.claimed_id) is not None


async def test_discovery_changes_reach_the_push_stream(lab: Lab) -> None:
    hub = lab.hub
    _, server = await lab.module(DeviceKind.SMARTPLUG, "PLUG-SSE")
    url = hub.url("/app/monitor/stream")
    async with hub.session.get(url, params={"access_token": hub.token}) as resp:
        assert resp.status == 200
        lab.announce(server)
        statuses: list[str] = []
        event = None
        async for raw in resp.content:
            line = raw.decode().strip()
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "discovery.updated":
                statuses.append(json.loads(line[6:])["candidate"]["status"])
                if statuses[-1] == "verified":
                    break
        assert statuses[0] == "pending" and statuses[-1] == "verified"
