"""The demo home on the network: every simulated module behind a real endpoint on loopback.

``serve_demo_home`` builds the physics (``devices.sim.physics.build_demo_home``) and gives each module an
endpoint, mixing protocols the way a real home mixes vendors: microinverters over SunSpec (legacy models 1/103,
DER models 701/702/704) and over ORES-HTTP, the battery over SunSpec DER models, the grid meter over SunSpec
model 203, the smart plugs over ORES-HTTP.  ``serve_modules`` does the same for any list of modules (the
benchmarks use it for hundreds).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from devices.attest import SimAttestation, demo_vendor_key, make_sim_attestation
from devices.model import DeviceKind
from devices.sim.base import SimServer, SimulatedModule
from devices.sim.firmware import SimFirmware
from devices.sim.ores_http_server import start_ores_http_server
from devices.sim.physics import build_demo_home
from devices.sim.sunspec_server import start_sunspec_server
from firmware.manifest import key_id as fw_key_id
from firmware.verify import VendorKey


def protocol_for(module: SimulatedModule, index: int) -> str:
    """Which endpoint a module gets: ``sunspec-legacy``, ``sunspec-der`` or ``ores-http``."""
    kind = module.info.kind
    if kind is DeviceKind.SMARTPLUG:
        return "ores-http"
    if kind is DeviceKind.METER:
        return "sunspec-legacy"
    if kind is DeviceKind.ENERGYSTORAGE:
        return ("sunspec-der", "ores-http")[index % 2]
    return ("sunspec-legacy", "sunspec-der", "ores-http")[index % 3]


def demo_attestation(module: SimulatedModule) -> SimAttestation:
    """A device key and certificate for a simulated module, signed by its vendor's PUBLIC demo key
    (``devices.attest.demo_vendor_key``); the device key is derived from vendor and serial, so a module keeps
    its key across restarts like real hardware does."""
    ident = module.info.identity
    return make_sim_attestation(
        demo_vendor_key(ident.vendor),
        vendor=ident.vendor,
        model=ident.model,
        serial=ident.serial,
        seed=f"{ident.vendor}\0{ident.serial}".encode(),
    )


def demo_firmware(module: SimulatedModule, *, reboot_s: float = 3.0) -> SimFirmware:
    """A/B firmware slots for a simulated module that accept images signed by its vendor's demo key.
    Versions whose pre-release tag is ``unhealthy`` (``2.0.0-unhealthy``) boot into a fault, so the demo
    can show a rollback."""
    ident = module.info.identity
    vendor_key = demo_vendor_key(ident.vendor).public_key()
    return SimFirmware(
        ident.vendor,
        ident.model,
        ident.firmware_version or "0.0.1",
        trusted={fw_key_id(vendor_key): VendorKey(ident.vendor, vendor_key)},
        reboot_s=reboot_s,
        unhealthy_tag="unhealthy",
    )


async def serve_module(module: SimulatedModule, protocol: str, host: str = "127.0.0.1") -> SimServer:
    if protocol == "ores-http":
        return await start_ores_http_server(
            module, host=host, attestation=demo_attestation(module), firmware=demo_firmware(module)
        )
    profile = "der" if protocol == "sunspec-der" else "legacy"
    return await start_sunspec_server(module, host=host, profile=profile)


async def serve_modules(modules: Sequence[SimulatedModule], host: str = "127.0.0.1") -> list[SimServer]:
    counters: dict[DeviceKind, int] = {}
    plan = []
    for module in modules:
        n = counters.get(module.info.kind, 0)
        counters[module.info.kind] = n + 1
        plan.append((module, protocol_for(module, n)))
    servers: list[SimServer] = []
    try:
        for module, protocol in plan:
            servers.append(await serve_module(module, protocol, host))
    except BaseException:
        await asyncio.gather(*(s.stop() for s in servers), return_exceptions=True)
        raise
    return servers


async def serve_demo_home(
    *, speedup: float = 60.0, seed: int = 1, host: str = "127.0.0.1"
) -> list[SimServer]:
    home = build_demo_home(speedup=speedup, seed=seed)
    return await serve_modules(home.modules, host)
